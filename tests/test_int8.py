"""Int8 files: each scale quantized on its own images, every branch of a switchable file
quantized (read from the graph, not the metadata), run in onnxruntime, refused when a branch
stays float, served by the torch-free runtime as a cascade, and driven from the CLI."""
import json

import numpy as np
import onnx
import pytest
import timm
import torch
from click.testing import CliRunner

import sct_convert as sct

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from sct_convert.cli import cli  # noqa: E402
from sct_convert.deploy.int8 import branch_precision  # noqa: E402
from sct_convert.runtime import CascadeSession, open_session  # noqa: E402

SCALES = [64, 48]


def metadata(path):
    return {p.key.split(".", 1)[1]: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def zero_point_types(path):
    """The element types of every DequantizeLinear's zero point (activations and weights), subgraphs included."""
    model = onnx.load(str(path))
    types = set()

    def walk(graph, outer):
        consts = {**outer, **{t.name: t.data_type for t in graph.initializer}}
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and len(node.input) > 2:
                types.add(consts.get(node.input[2]))
            for attr in node.attribute:
                if attr.g.name:
                    walk(attr.g, consts)

    walk(model.graph, {})
    return types


@pytest.fixture(scope="module")
def labelled():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(48, 3, 72, 72, generator=g)
    return [(x[:24], torch.randint(0, 3, (24,), generator=g)), (x[24:], torch.randint(0, 3, (24,), generator=g))]


@pytest.fixture(scope="module")
def model(labelled):
    torch.manual_seed(0)
    net = sct.convert(timm.create_model("test_resnet", num_classes=3), SCALES)
    sct.calibrate(net, [x for x, _ in labelled])  # statistics of real activations: outputs that vary
    net.eval()
    with torch.no_grad():  # branches that differ, so a wrong branch is a wrong answer
        for _, layer in sct.scale_specific_layers(net):
            layer.branches["48"].bias.add_(0.5)
    return net


@pytest.fixture(scope="module")
def switchable(model, labelled, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "m8.onnx"
    return sct.export_onnx(model, path, int8=sct.Int8(labelled))


def test_every_branch_of_the_switchable_file_is_int8_read_from_the_graph(switchable):
    assert branch_precision(onnx.load(str(switchable))) == {"64": "int8", "48": "int8"}
    meta = metadata(switchable)
    assert meta["precision"] == "int8"
    settings = json.loads(meta["int8"])
    assert settings["activations"] == "uint8 asymmetric" and settings["images"] == 48
    # the fast default: uint8 activations, int8 weights (int32 biases)
    assert zero_point_types(switchable) == {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT32}


def test_each_branch_is_the_per_scale_int8_file_of_its_scale(model, switchable, labelled, tmp_path):
    """The switchable file is the per-scale int8 graphs under one router: at each scale it answers
    as that scale's own int8 file, and unlike the other branch."""
    session = open_session(switchable)
    x = torch.rand(4, 3, 64, 64)
    for hw in SCALES:
        xs = sct.resize_to(x, (hw, hw))
        got = session.run(None, {"images": xs.numpy()})[0]
        with torch.no_grad():
            own = sct.extract(model, hw)(xs).numpy()
            other = sct.extract(model, SCALES[1 - SCALES.index(hw)])(xs).numpy()
        assert np.abs(got - own).max() < 0.5 * np.abs(got - other).max(), hw
    per_scale = open_session(sct.export_onnx(model, tmp_path / "q48.onnx", scale=48, int8=sct.Int8(labelled)))
    xs = sct.resize_to(x, (48, 48)).numpy()
    np.testing.assert_allclose(session.run(None, {"images": xs})[0], per_scale.run(None, {"images": xs})[0],
                               atol=1e-5)


def test_the_accuracy_report_holds_each_scales_float_and_int8_top1(model, switchable, labelled):
    report = json.loads(metadata(switchable)["int8_report"])
    assert list(report) == ["64", "48"]
    x = torch.cat([b[0] for b in labelled])
    y = torch.cat([b[1] for b in labelled])
    session = open_session(switchable)
    for hw in SCALES:
        xs = sct.resize_to(x, (hw, hw))
        with torch.no_grad():
            float_top1 = 100 * (sct.extract(model, hw)(xs).argmax(1) == y).float().mean().item()
        int8_top1 = 100 * (session.run(None, {"images": xs.numpy()})[0].argmax(1) == y.numpy()).mean()
        row = report[str(hw)]
        assert row["images"] == 48
        assert row["float_top1"] == pytest.approx(float_top1, abs=0.01)
        assert row["int8_top1"] == pytest.approx(int8_top1, abs=0.01)
        assert row["change"] == pytest.approx(int8_top1 - float_top1, abs=0.02)


def test_a_per_scale_int8_file_with_options_keeps_what_was_excluded_in_float(model, tmp_path):
    images = torch.rand(16, 3, 64, 64)
    fp32 = sct.export_onnx(model, tmp_path / "f.onnx", scale=48)
    path = sct.export_onnx(model, tmp_path / "q.onnx", scale=48,
                           int8=sct.Int8(images, symmetric=True, exclude_types=("Gemm",)))
    precision = branch_precision(onnx.load(str(path)))
    assert list(precision) == [""] and precision[""].startswith("int8 (") and "of" in precision[""]
    assert onnx.TensorProto.UINT8 not in zero_point_types(path)  # symmetric: int8 activations too
    assert json.loads(metadata(path)["int8"])["activations"] == "int8 symmetric"
    assert path.stat().st_size < fp32.stat().st_size
    assert "int8_report" not in metadata(path)  # unlabelled images: no report


def test_a_file_that_would_claim_int8_with_float_branches_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="float branches .*nothing was written"):
        sct.export_onnx(model, tmp_path / "q.onnx", scale=48,
                        int8=sct.Int8(torch.rand(4, 3, 48, 48), exclude_types=("Conv", "Gemm", "MatMul")))
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(ranges="each"), "ranges='each'"), (dict(method="mse"), "method='mse'"), (dict(max_images=0), "at least one"),
])
def test_bad_int8_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sct.Int8(torch.rand(1, 3, 8, 8), **kwargs)


def test_an_int8_cascade_is_served_by_the_torch_free_runtime(model, tmp_path):
    cascade = sct.Cascade(model, {48: 0.6, 64: None})
    path = sct.export_onnx(cascade, tmp_path / "c8.onnx", int8=torch.rand(16, 3, 64, 64))
    assert metadata(path)["precision"] == "int8"
    session = CascadeSession(str(path))
    x = np.random.default_rng(0).random((6, 3, 64, 64), dtype=np.float32)
    result = session.run(x)
    with torch.no_grad():
        want = cascade.run(torch.from_numpy(x))
    # int8 confidences can cross a threshold that float ones do not: most stages agree
    assert (result.scales == want.scales.numpy()).mean() >= 0.5 and set(result.scales) <= {48, 64}
    assert result.logits.shape == (6, 3)


def test_a_detector_refuses_int8_before_any_trace(tmp_path):
    import torchvision

    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3)
    det = sct.convert(det, [128, 96]).eval()
    with pytest.raises(ValueError, match="int8 export covers classifiers"):
        sct.export_onnx(det, tmp_path / "d.onnx", scale=128, int8=torch.rand(2, 3, 128, 128))


def test_cli_int8_export_and_inspect(tmp_path, folder):
    runner = CliRunner()
    ckpt = tmp_path / "m.safetensors"
    assert runner.invoke(cli, ["convert", "test_resnet", "--scales", "64,48", "--num-classes", "3",
                               "--out", str(ckpt)]).exit_code == 0
    out = tmp_path / "m8.onnx"
    result = runner.invoke(cli, ["export", str(ckpt), "--format", "onnx", "--int8", "--calibration-images",
                                 str(folder), "--calibration-count", "20", "--report-images", str(folder),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "scale 64: top-1" in result.output and "scale 48: top-1" in result.output
    shown = runner.invoke(cli, ["inspect", str(out)]).output
    assert "precision:       64: int8, 48: int8" in shown
    assert "uint8 asymmetric activations" in shown and "(20 calibration images)" in shown
    for args, message in [(["--symmetric"], "are --int8 options"), (["--int8"], "needs --calibration-images"),
                          (["--int8", "--calibration-images", str(tmp_path / "none")], "none")]:
        result = runner.invoke(cli, ["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "x.onnx"),
                                     *args])
        assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "x.onnx").exists()
