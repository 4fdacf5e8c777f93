"""Files from elsewhere: every damaged byte, header or metadata field of a checkpoint, an ONNX
file or a cascade gets sct_convert's typed error naming the file and the field, never a raw
parser error and never silent acceptance. Property-based (hypothesis) with bounded examples."""
import json
import shutil

import numpy as np
import onnx
import pytest
import safetensors
import safetensors.torch
import timm
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sct_convert as sct
from sct_convert.deploy.api import read_deploy_metadata
from sct_convert.runtime import CascadeSession

TYPED = (sct.FileFormatError, sct.WeightsMismatchError)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A combined checkpoint holding a cascade, and its cascade ONNX file."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = sct.convert(timm.create_model("test_resnet", num_classes=4), [64, 48]).eval()
    cascade = sct.Cascade(model, {48: 0.6, 64: None})
    return {"model": model, "checkpoint": sct.save(cascade, root / "m.safetensors"),
            "onnx": sct.export_onnx(cascade, root / "m.onnx"), "root": root}


def rewrite_metadata(src, dst, change):
    """``src``'s tensors with ``change(metadata)`` as the metadata."""
    with safetensors.safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    safetensors.torch.save_file(tensors, str(dst), metadata=meta)
    return dst


def rewrite_onnx_metadata(src, dst, change):
    model = onnx.load(str(src))
    props = {p.key[len("sct_convert."):]: p.value for p in model.metadata_props if p.key.startswith("sct_convert.")}
    change(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {f"sct_convert.{k}": v for k, v in props.items()})
    onnx.save(model, str(dst))
    return dst


def setter(field, value):
    def change(meta):
        if value is None:
            meta.pop(field, None)
        else:
            meta[field] = value
    return change


def stage_spec(**stage0):
    base = {"confidence": "softmax", "antialias": True,
            "stages": [{"scale": "48", "size": [48, 48], "threshold": 0.6, "macs": 10},
                       {"scale": "64", "size": [64, 64], "threshold": None, "macs": 20}]}
    base["stages"][0].update(stage0)
    return json.dumps(base)


CHECKPOINT_DAMAGE = [
    ("scales", "[64, 48"), ("scales", "[]"), ("scales", "[0, 48]"), ("scales", "[64, [64, 64]]"),
    ("scales", '"64"'), ("scales", "[[1, 2, 3]]"), ("scales", None),
    ("unknown_scale", "sideways"), ("scale_specific_bn", "yes"),
    ("num_classes", "ten"), ("num_classes", "-1"), ("num_classes", "0"), ("in_chans", "3.0"),
    ("aux_loss", "true"), ("input_layout", "NHWC please"), ("layers", "many"), ("layers", "99"),
    ("versions", "garbage"), ("versions", '{"torch": 2}'), ("versions", "[1]"),
    ("source", "pip"), ("arch", "line\nbreak"), ("arch", "no_such_model_at_all"),
    ("format", "sct-convert-v9"), ("format_version", "9"),
    ("cascade", "{"), ("cascade", "[]"), ("cascade", stage_spec(size=[32, 32])),
    ("cascade", stage_spec(threshold=2.0)), ("cascade", stage_spec(threshold=None)),
    ("cascade", stage_spec(size=[48])), ("cascade", stage_spec(macs=-5)),
    ("cascade", json.dumps({"confidence": "vibes", "stages": []})),
]


@pytest.mark.parametrize("field, value", CHECKPOINT_DAMAGE, ids=[f"{f}={v!r}"[:40] for f, v in CHECKPOINT_DAMAGE])
def test_each_damaged_checkpoint_field_is_a_named_error(files, tmp_path, field, value):
    path = rewrite_metadata(files["checkpoint"], tmp_path / "bad.safetensors", setter(field, value))
    load = sct.load_cascade if field == "cascade" else sct.load
    with pytest.raises(sct.FileFormatError) as info:
        load(path)
    assert info.value.field == field and str(path) in str(info.value), str(info.value)
    assert "Traceback" not in str(info.value)


ONNX_DAMAGE = [
    ("scales", "not json"), ("scales", "[64, 64]"), ("routing", "teleport"), ("input_name", "a\nb"),
    ("versions", "1.0"), ("num_classes", "many"), ("format", "something else"),
    ("cascade", "{"), ("cascade", stage_spec(size=[40, 40])), ("cascade", stage_spec(threshold=0)),
    ("scale", "40"), ("part", "wheels"), ("opset", "-3"), ("sides", "[0]"), ("transform_sizes", "[1]"),
    ("exporter", "magic"), ("outputs", "boxes,,scores"), ("max_error", "nan"), ("checked_detections", "x"),
    ("routing_note", "a\x00b"),
]


@pytest.mark.parametrize("field, value", ONNX_DAMAGE, ids=[f"{f}={v!r}"[:40] for f, v in ONNX_DAMAGE])
def test_each_damaged_onnx_field_is_a_named_error_in_the_reader_and_the_runtime(files, tmp_path, field, value):
    path = rewrite_onnx_metadata(files["onnx"], tmp_path / "bad.onnx", setter(field, value))
    with pytest.raises(sct.FileFormatError) as info:
        read_deploy_metadata(path)
    assert info.value.field == field and str(path) in str(info.value)
    if field in ("scales", "cascade"):  # what the torch-free runtime reads
        with pytest.raises(sct.FileFormatError) as info:
            CascadeSession(str(path))
        assert info.value.field == field


def test_the_runtime_refuses_a_file_that_is_not_onnx_or_holds_no_cascade(files, tmp_path):
    with pytest.raises(sct.FileFormatError, match="not an ONNX file"):
        CascadeSession(str(files["checkpoint"]))
    plain = sct.export_onnx(files["model"], tmp_path / "plain.onnx", scale=48)
    with pytest.raises(sct.FileFormatError, match="holds no cascade") as info:
        CascadeSession(str(plain))
    assert info.value.field == "cascade"


def test_an_intact_file_still_loads(files):
    cascade = sct.load_cascade(files["checkpoint"])
    assert sct.scales_of(cascade.model) == (64, 48)
    assert json.loads(read_deploy_metadata(files["onnx"])["scales"]) == [64, 48]


@FAST
@given(data=st.data())
def test_flipped_and_truncated_checkpoints_load_or_get_a_typed_error(files, tmp_path, data):
    blob = bytearray(files["checkpoint"].read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        header = int.from_bytes(blob[:8], "little") + 8  # flips in the header and metadata, where parsing is
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            at = data.draw(st.integers(0, min(header, len(blob)) - 1), label="offset")
            blob[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(blob))
    try:
        sct.load(path)
    except TYPED as e:
        assert str(path) in str(e) or isinstance(e, sct.WeightsMismatchError), str(e)


FIELDS = ["scales", "unknown_scale", "scale_specific_bn", "num_classes", "in_chans", "input_layout", "layers",
          "versions", "source", "arch", "cascade", "format", "format_version"]


@FAST
@given(field=st.sampled_from(FIELDS), value=st.one_of(st.text(max_size=40), st.integers().map(str),
                                                       st.lists(st.integers(-5, 300), max_size=4).map(json.dumps)))
@example(field="source", value="")  # found by CI: an emptied source named no field
@example(field="arch", value="")
def test_random_metadata_values_load_or_name_the_field(files, tmp_path, field, value):
    path = rewrite_metadata(files["checkpoint"], tmp_path / "random.safetensors", setter(field, value))
    try:
        (sct.load_cascade if field == "cascade" else sct.load)(path)
    except sct.FileFormatError as e:
        # new scales can leave the cascade's stages or the layer count inconsistent: named too
        assert e.field == field or (field == "scales" and e.field in ("cascade", "layers")), (field, value, str(e))
    except sct.WeightsMismatchError:
        assert field in ("num_classes", "in_chans", "scales", "arch", "source"), (field, value)


def test_a_pth_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (__file__, str(marker)))

    torch.save({"fc.weight": torch.zeros(2, 2), "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(sct.UnsafeCheckpointError, match="could run code"):
        sct.load_weights(timm.create_model("test_resnet"), tmp_path / "evil.pth")
    assert not marker.exists()


# -- routing: every backend picks what an independent reference picks ---------------------------


def reference_branch(hw, sizes):
    """Written here from DESIGN.md's rule, not imported: exact (h, w) first, else the fewest
    pixels away, ties to the scale listed first."""
    for i, size in enumerate(sizes):
        if tuple(size) == tuple(hw):
            return i
    gaps = [abs(hw[0] * hw[1] - h * w) for h, w in sizes]
    return gaps.index(min(gaps))


sides = st.integers(1, 1024)
scale_sets = st.lists(st.tuples(sides, sides), min_size=1, max_size=4, unique=True)


@pytest.fixture(scope="module")
def scripted_choose():
    from sct_convert.core.rule import script_choose

    return torch.jit.script(script_choose)


@FAST
@given(sizes=scale_sets, hw=st.tuples(sides, sides))
def test_python_torch_torchscript_and_onnx_route_as_the_reference(sizes, hw, scripted_choose):
    import onnxruntime as ort

    from sct_convert.core.rule import choose, choose_in_graph, onnx_route_nodes

    want = reference_branch(hw, sizes)
    assert choose(hw, sizes, "nearest") == want
    table = [list(s) for s in sizes]
    assert int(choose_in_graph(torch.zeros(1, 1, *hw), table)) == want
    assert scripted_choose(hw[0], hw[1], table, True) == want
    nodes, constants = onnx_route_nodes("x", sizes, "r/")
    graph = onnx.helper.make_graph(
        nodes, "route", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, "h", "w"])],
        [onnx.helper.make_tensor_value_info("r/index", onnx.TensorProto.INT64, [])], constants)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert int(session.run(None, {"x": np.zeros((1, 1, *hw), np.float32)})[0]) == want


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(8, 96), st.integers(8, 96)), min_size=2, max_size=3, unique=True),
       probes=st.lists(st.tuples(st.integers(1, 128), st.integers(1, 128)), min_size=1, max_size=4))
def test_a_converted_model_routes_every_size_as_the_reference(sizes, probes):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    scales = sorted(sizes, key=lambda s: -s[0] * s[1])  # largest first, as convert asks
    model = sct.convert(net, scales).eval()
    for hw in probes:
        assert sct.route(model, hw) == scales[reference_branch(hw, scales)], (scales, hw)
