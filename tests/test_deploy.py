"""ONNX and torch.export files: one that serves every scale, or one per scale, checked in real
runtimes (onnxruntime, torch.export.load) against the eager converted model."""
import json
import sys
import warnings

import pytest
import timm
import torch
from _util import converted_test_resnet
from click.testing import CliRunner

import sct_convert as sct
from sct_convert.cli import cli
from sct_convert.deploy.api import onnx_max_relative_error, read_deploy_metadata

SCALES = [64, 48, 32]
BETWEEN = (56, 56)  # not a trained scale: routed to the nearest (64) in the file as in eager


@pytest.fixture(scope="module")
def model():
    return converted_test_resnet(SCALES, num_classes=7)[1]  # a file that took the wrong branch would show


@pytest.fixture(scope="module")
def switchable_onnx(model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return sct.export_onnx(model, tmp_path_factory.mktemp("onnx") / "m.onnx")


@pytest.mark.slow
def test_one_onnx_file_serves_every_scale_in_onnxruntime(model, switchable_onnx):
    import onnx

    sizes = [(s, s) for s in SCALES] + [BETWEEN, (48, 40)]
    errors = onnx_max_relative_error(model, switchable_onnx, sizes, batch=3)
    assert max(errors) < 1e-4, dict(zip(sizes, errors))
    graph = onnx.load(str(switchable_onnx)).graph
    ops = {n.op_type for n in graph.node}
    assert {"Shape", "ArgMin", "If"} <= ops  # routed in the graph, one subgraph per scale
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3]))  # batch, H, W dynamic


def _op_counts(graph, counts=None, domains=False):
    import onnx

    counts = {} if counts is None else counts
    for node in graph.node:
        op = f"{node.domain or 'ai.onnx'}:{node.op_type}" if domains else node.op_type
        counts[op] = counts.get(op, 0) + 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _op_counts(attr.g, counts, domains)
    return counts


def _optimized(path, tmp_path):
    """The graph onnxruntime runs, after its load-time optimisation."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"optimized_{path.name}")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def _conv_counts(graph):
    """Conv-like ops by domain (NCHWc, fused, plain)."""
    return {op: n for op, n in _op_counts(graph, domains=True).items() if "Conv" in op}


def _outer_reads(graph, branches=None):
    """``{branch name: names it reads from enclosing graphs}`` for every ``scale_*`` subgraph."""
    import onnx

    branches = {} if branches is None else branches
    own = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    own |= {o for node in graph.node for o in node.output}
    if graph.name.startswith("scale_"):
        branches[graph.name] = {i for node in graph.node for i in node.input if i and i not in own}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _outer_reads(attr.g, branches)
    return branches


@pytest.mark.slow
def test_onnxruntime_optimizes_each_branch_as_a_per_scale_file(tmp_path):
    """A branch must not run slower than the per-scale file: convs without BN (squeeze-excite)
    reading weights from the main graph stayed out of onnxruntime's NCHWc layout (1.36x), and a
    classifier's Gemm reading its weight from the main graph through two ``If`` levels ran 1.4x
    slower (``benchmarks/onnx_outer_scope.py``). Once optimised, a branch reads only the image."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = sct.convert(timm.create_model("test_efficientnet", num_classes=7), SCALES).eval()
    switchable = _optimized(sct.export_onnx(model, tmp_path / "m.onnx"), tmp_path)
    per_scale = _conv_counts(_optimized(sct.export_onnx(model, tmp_path / "m32.onnx", scale=32), tmp_path))
    assert _conv_counts(switchable) == {op: len(SCALES) * n for op, n in per_scale.items()}
    reads = _outer_reads(switchable)
    assert len(reads) == len(SCALES) and all(names == {"images"} for names in reads.values()), reads


def test_switchable_onnx_shares_weights_and_onnxruntime_folds_every_branch(model, switchable_onnx, tmp_path):
    import onnx
    import onnxruntime as ort

    per_scale = sct.export_onnx(model, tmp_path / "m64.onnx", scale=64)
    # one copy of the conv weights, plus each scale's BN: far from three copies
    assert switchable_onnx.stat().st_size < 1.3 * per_scale.stat().st_size
    assert _op_counts(onnx.load(str(switchable_onnx)).graph)["BatchNormalization"] > 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(switchable_onnx), options, providers=["CPUExecutionProvider"])
    optimized = _op_counts(onnx.load(options.optimized_model_filepath).graph)
    assert "BatchNormalization" not in optimized and optimized["If"] == len(SCALES) - 1


@pytest.mark.parametrize("scale", [None, 32], ids=["switchable", "per-scale"])
@pytest.mark.slow
def test_onnx_past_protobufs_2gb_limit_keeps_weights_beside_it(model, tmp_path, monkeypatch, scale):
    """A model over 2 GB (RegNetY-128GF) cannot be one protobuf: its weights go to ``<name>.data``
    (ONNX external data), written atomically with the model; onnxruntime reads both."""
    pytest.importorskip("onnxruntime")
    import onnx

    from sct_convert.deploy import onnx_graph
    from sct_convert.deploy.onnx_graph import initializers

    monkeypatch.setattr(onnx_graph, "_PROTOBUF_LIMIT", 0)  # as if this tiny model were over 2 GB
    path = sct.export_onnx(model, tmp_path / "m.onnx", scale=scale)
    data = tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # nothing staged left
    external = [{e.key: e.value for e in t.external_data}
                for t in initializers(onnx.load(str(path), load_external_data=False).graph)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e["location"] for e in external} == {data.name}
    assert max(int(e["offset"]) + int(e["length"]) for e in external) == data.stat().st_size
    sizes = [(32, 32)] if scale else [(s, s) for s in SCALES] + [BETWEEN]
    assert max(onnx_max_relative_error(model, path, sizes)) < 1e-4
    assert read_deploy_metadata(path)["routing"] == ("fixed" if scale else "nearest")


def test_per_scale_onnx_file_is_the_plain_architecture(model, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    path = sct.export_onnx(model, tmp_path / "m32.onnx", scale=32)
    assert onnx_max_relative_error(model, path, [(32, 32)], batch=3)[0] < 1e-4
    graph = onnx.load(str(path)).graph
    assert "ArgMin" not in {n.op_type for n in graph.node}
    dims = graph.input[0].type.tensor_type.shape.dim
    assert (dims[2].dim_value, dims[3].dim_value) == (32, 32) and dims[0].dim_param


def test_onnx_metadata_is_read_back_by_inspect(model, switchable_onnx):
    meta = read_deploy_metadata(switchable_onnx)
    assert json.loads(meta["scales"]) == SCALES and meta["routing"] == "nearest"
    assert meta["arch"] == "test_resnet" and meta["source"] == "timm" and meta["num_classes"] == "7"
    assert json.loads(meta["versions"])["sct_convert"] == sct.__version__  # the checkpoints' schema
    result = CliRunner().invoke(cli, ["inspect", str(switchable_onnx)])
    assert result.exit_code == 0, result.output
    assert "64, 48, 32" in result.output and "every scale" in result.output
    assert f"sct-convert {sct.__version__}, torch {torch.__version__}" in result.output


@pytest.mark.parametrize("scale", [None, 48], ids=["switchable", "per-scale"])
def test_torch_export_program_round_trip(model, tmp_path, scale):
    path = sct.export_program(model, tmp_path / "m.pt2", scale=scale)
    loaded = torch.export.load(str(path)).module()
    sizes = [48] if scale else SCALES + [56]
    with torch.no_grad():
        for s in sizes:
            x = torch.randn(3, 3, s, s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 56 is routed to the nearest branch, warned once
                want = model(x)
            assert torch.allclose(loaded(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), s
    meta = read_deploy_metadata(path)
    assert meta["format"] == "sct-convert/pt2" and meta.get("scale") == ("48" if scale else None)


@pytest.mark.slow
def test_cli_exports_every_format(model, tmp_path):
    pytest.importorskip("onnxruntime")
    combined = sct.save(model, tmp_path / "m.safetensors")
    runner = CliRunner()
    for fmt, scale, out in (("onnx", None, "all.onnx"), ("pt2", "32", "m32.pt2"),
                            ("safetensors", "48", "m48.safetensors")):
        args = ["export", str(combined), "--format", fmt, "--out", str(tmp_path / out)]
        result = runner.invoke(cli, args + (["--scale", scale] if scale else []))
        assert result.exit_code == 0, result.output
        assert (tmp_path / out).is_file()
        if fmt == "onnx":  # progress: one line per step when not on a terminal (3 traces, write, 3 runs)
            steps = [line for line in result.output.splitlines() if line.startswith("export onnx: ")]
            assert [line.split()[2] for line in steps] == [f"{i}/7" for i in range(1, 8)], result.output
            assert "traced scale 64" in steps[0] and "ran scale 32 in onnxruntime" in steps[-1]
        if fmt == "pt2":
            assert "export pt2: 2/2 written" in result.output
    assert onnx_max_relative_error(model, tmp_path / "all.onnx", [(48, 48)])[0] < 1e-4
    # the per-scale files hold their own scale's branch (every branch of `model` differs)
    with torch.no_grad():
        x32, x48 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)
        program = torch.export.load(str(tmp_path / "m32.pt2")).module()
        assert torch.allclose(program(x32), model(x32), atol=1e-5)
        plain = sct.load_plain(timm.create_model("test_resnet", num_classes=7).eval(), tmp_path / "m48.safetensors")
        assert torch.allclose(plain(x48), model(x48), atol=1e-5)
        with sct.scale(model, 64):
            assert not torch.allclose(plain(x48), model(x48), atol=1e-3)
    result = runner.invoke(cli, ["export", str(combined), "--format", "safetensors", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "--scale is required" in result.output


def test_missing_onnx_extra_is_a_clear_error_with_an_install_command_that_works_here(model, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    import sct_convert._utils.environment

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match=r"pip install -e \"(.+)\[onnx\]\"") as info:
        sct.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    clone = Path(re.search(r'pip install -e "(.+)\[onnx\]"', str(info.value)).group(1))
    assert "onnx =" in (clone / "setup.cfg").read_text()  # the clone this runs from, which has the extra
    monkeypatch.setattr(sct_convert._utils.environment, "source_checkout", lambda: None)  # a wheel install
    with pytest.raises(ImportError, match=r'pip install "sct-convert\[onnx\]"'):
        sct.export_onnx(model, tmp_path / "m.onnx")


def test_unwritable_target_is_a_clear_error_and_leaves_nothing(model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        sct.export_program(model, tmp_path / "missing" / "m.pt2")
    existing = tmp_path / "keep.pt2"
    existing.write_bytes(b"old")

    def disk_full(program, f, **kwargs):  # fails halfway through writing
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", disk_full)
    with pytest.raises(ValueError, match="No space left"):
        sct.export_program(model, existing, scale=32)
    assert existing.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.pt2"]
