"""Per-scale ONNX files of torchvision detectors: the plain detector of one scale, written through
the first exporter that traces it, equal to ``sct.extract(model, s)`` in onnxruntime."""
import pytest
import torch
import torchvision
from click.testing import CliRunner

import sct_convert as sct
from sct_convert.cli import cli
from sct_convert.deploy.api import read_deploy_metadata

from _util import blobs, detector, same_detections

ort = pytest.importorskip("onnxruntime")
TV = torchvision.models.detection


def run(path, image):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": image.numpy()})))


@pytest.mark.parametrize("builder", [TV.ssdlite320_mobilenet_v3_large, TV.fasterrcnn_mobilenet_v3_large_320_fpn],
                         ids=["ssdlite", "fasterrcnn"])
def test_a_per_scale_file_is_the_plain_detector_of_that_scale_at_any_image_size(builder, tmp_path):
    model = detector(builder)
    path = sct.export_onnx(model, tmp_path / "det_256.onnx", 256, exporter="torchscript")
    meta = read_deploy_metadata(path)
    assert meta["scale"] == "256" and meta["exporter"] == "torchscript" and float(meta["max_error"]) < 5e-3
    assert int(meta["checked_detections"]) >= 10  # a calibrated model: detections to compare
    plain, other = sct.extract(model, 256).eval(), sct.extract(model, 320).eval()
    for seed, hw in enumerate([(300, 400), (200, 260)]):  # the transform resizes any size: dims are dynamic
        image = blobs(hw, 10 + seed)
        got = run(path, image)
        with torch.no_grad():
            want, wrong = plain([image])[0], other([image])[0]
        assert set(got) == set(want)
        same_detections(got, want)
        with pytest.raises(AssertionError, match="missing"):  # the other scale's branch detects otherwise
            same_detections(got, wrong)


def test_a_detector_file_serves_one_scale_and_names_the_way(tmp_path):
    model = detector(TV.ssdlite320_mobilenet_v3_large)
    with pytest.raises(ValueError, match=r"one scale per ONNX file.*pass scale=\.\.\., one of 320, 256"):
        sct.export_onnx(model, tmp_path / "all.onnx")
    with pytest.raises(ValueError, match="exporter='trace'"):
        sct.export_onnx(model, tmp_path / "x.onnx", 256, exporter="trace")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_torch_export_route_is_tried_first_and_the_file_says_which_ran(tmp_path):
    model = detector(TV.ssdlite320_mobilenet_v3_large)
    plain = sct.extract(model, 256).eval()
    try:
        torch.export.export(plain, ([torch.rand(3, 256, 256)],), strict=False)
        expected = "dynamo"
    except Exception:  # noqa: BLE001 - torchvision's detector does not trace with this torch
        expected = "torchscript"
    path = sct.export_onnx(model, tmp_path / "det.onnx", 256)
    assert read_deploy_metadata(path)["exporter"] == expected


def test_cli_exports_a_detectors_scale_and_inspect_says_how(tmp_path):
    model = detector(TV.ssdlite320_mobilenet_v3_large)
    combined = sct.save(model, tmp_path / "det.safetensors", arch="ssdlite320_mobilenet_v3_large",
                        source="torchvision")
    out = tmp_path / "det_256.onnx"
    r = CliRunner().invoke(cli, ["export", str(combined), "--format", "onnx", "--scale", "256", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "scale 256 only" in r.output and "exporter:" in r.output and "one (3, H, W) image" in r.output
    assert "detections matched" in r.output
