"""A torchvision detector's core (backbone and dense heads) as one ONNX file for every scale, with
torchvision's own pre- and post-processing around it: pre + core + post is the converted model."""
import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torchvision.models.detection import FCOS, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import sct_convert as sct
from sct_convert.cli import cli
from sct_convert.deploy.api import read_deploy_metadata

from _util import SCALES_320_256 as SCALES, blobs, detector, same_detections

TV = torchvision.models.detection


def resnet18_fpn(one_stage):
    """A ResNet-18 FPN as torchvision builds ResNet-50's for its detectors (its builders offer
    ResNet-50 only): the same detector classes, heads and post-processing at a fraction of the cost."""
    if one_stage:  # RetinaNet's and FCOS's: C3-C5 and P6, P7
        return resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256), trainable_layers=5,
                                   norm_layer=torch.nn.BatchNorm2d)
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                               norm_layer=torch.nn.BatchNorm2d)


SMALL = dict(min_size=320, max_size=533)
ANY_SCORE = dict(score_thresh=0.0)  # a random-init one-stage head scores every box near its 0.01 prior
FEW = dict(rpn_post_nms_top_n_test=200, box_detections_per_img=20)  # a second stage on fewer boxes


def spread_scores(model):
    """Class logits weights 100x their init: scores far enough apart to rank (at init every box
    scores within 1e-4 of the 0.01 prior, and which of two equal boxes NMS keeps is arbitrary)."""
    torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=1.0)
    return model


def small_retinanet(weights=None, weights_backbone=None, num_classes=3):
    return spread_scores(RetinaNet(resnet18_fpn(True), num_classes, **SMALL, **ANY_SCORE))


def fcos(weights=None, weights_backbone=None, num_classes=3):
    return spread_scores(FCOS(resnet18_fpn(True), num_classes, **SMALL, **ANY_SCORE))


def maskrcnn(weights=None, weights_backbone=None, num_classes=3):
    return MaskRCNN(resnet18_fpn(False), num_classes, **SMALL, **FEW)


def keypointrcnn(weights=None, weights_backbone=None, num_classes=3):
    return KeypointRCNN(resnet18_fpn(False), 2, num_keypoints=5, **SMALL, **FEW)


# images of both orientations and a wide one: the batch is padded square, the wide one capped
IMAGES = [(240, 300), (300, 220), (120, 400)]
EXPORTED = {"ssdlite": TV.ssdlite320_mobilenet_v3_large, "fasterrcnn": TV.fasterrcnn_mobilenet_v3_large_320_fpn,
            "retinanet": small_retinanet}


def eager(model, images, s):
    with sct.scale(model, s), torch.no_grad():
        return model(images)


@pytest.mark.parametrize("builder", [
    TV.ssdlite320_mobilenet_v3_large, TV.fasterrcnn_mobilenet_v3_large_320_fpn,
    pytest.param(small_retinanet, marks=pytest.mark.slow), pytest.param(fcos, marks=pytest.mark.slow),
    pytest.param(maskrcnn, marks=pytest.mark.slow), pytest.param(keypointrcnn, marks=pytest.mark.slow)],
    ids=["ssdlite", "fasterrcnn", "retinanet", "fcos", "maskrcnn", "keypointrcnn"])
def test_pre_core_post_is_the_model_at_every_scale(builder):
    model = detector(builder)
    core = sct.detector_core(model)
    images = [blobs(hw, i) for i, hw in enumerate(IMAGES)]
    for s in SCALES:
        batch = sct.detector_preprocess(model, images, s)
        assert batch.side == s and batch.scale == s
        with torch.no_grad():
            outputs = core(batch.tensor, batch.side)
        got, want = sct.detector_postprocess(model, outputs, batch), eager(model, images, s)
        for g, w in zip(got, want):  # the same code on the same tensors: equal, not close
            assert g.keys() == w.keys()
            for k in w:
                torch.testing.assert_close(g[k], w[k], rtol=0, atol=0)


def test_the_core_runs_the_branch_of_the_size_it_is_given():
    model = detector(TV.ssdlite320_mobilenet_v3_large)
    core = sct.detector_core(model)
    batch = sct.detector_preprocess(model, [blobs((300, 300), 0)], 256)
    with torch.no_grad():
        at_256, told_320 = core(batch.tensor, 256), core(batch.tensor, 320)
        with sct.scale(model, 320):
            pinned_320 = core(batch.tensor)
    assert not torch.equal(at_256["cls_logits"], told_320["cls_logits"])
    torch.testing.assert_close(told_320, pinned_320, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the side its batch was resized to"):
        core(batch.tensor)


def test_bad_uses_are_refused_with_the_fix():
    model = detector(TV.ssdlite320_mobilenet_v3_large)
    batch = sct.detector_preprocess(model, [blobs((200, 200), 0)], 320)
    with torch.no_grad():
        outputs = sct.detector_core(model)(batch.tensor, batch.side)
    with pytest.raises(ValueError, match="feature_"):
        sct.detector_postprocess(model, {k: v for k, v in outputs.items() if not k.startswith("feature_")}, batch)
    model.train()
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        sct.detector_postprocess(model, outputs, batch)
    classifier = sct.convert(torchvision.models.resnet18(num_classes=3), [64, 32])
    with pytest.raises(ValueError, match="not a torchvision detector"):
        sct.detector_core(classifier)
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="part='core' splits a torchvision detector"):
        sct.export_onnx(classifier, "never.onnx", part="core")
    with pytest.raises(ValueError, match="part='whole'.*choose one of 'model', 'core'"):
        sct.export_onnx(classifier, "never.onnx", part="whole")
    with pytest.warns(UserWarning, match="not one of the scales"):
        same_side = sct.convert(TV.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3),
                                [(320, 256), (256, 320)])
    with pytest.raises(ValueError, match="same side.*scale=..., part='core'"):
        sct.export_onnx(same_side, "never.onnx", part="core")


@pytest.fixture(scope="module", params=list(EXPORTED))
def exported(request, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    model = detector(EXPORTED[request.param])
    path = sct.export_onnx(model, tmp_path_factory.mktemp("core") / f"{request.param}_core.onnx", part="core")
    return model, path


def run_core(path, batch, switchable=True):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, batch.feeds(switchable))))


@pytest.mark.slow
def test_one_core_file_serves_every_scale_in_onnxruntime(exported):
    model, path = exported
    meta = read_deploy_metadata(path)
    assert meta["part"] == "core" and meta["routing"] == "size_input" and json.loads(meta["sides"]) == SCALES
    assert meta["exporter"] == "dynamo"  # torch.export traces the core: the route the file says ran
    assert float(meta["max_error"]) < 5e-3 and int(meta["checked_detections"]) >= 10
    images = [blobs(hw, 10 + i) for i, hw in enumerate(IMAGES)]
    for s, other in zip(SCALES, SCALES[::-1]):
        batch = sct.detector_preprocess(model, images, s)
        got = sct.detector_postprocess(model, run_core(path, batch), batch)
        for g, w in zip(got, eager(model, images, s)):
            same_detections(g, w)
        with pytest.raises(AssertionError, match="missing"):  # the other branch detects otherwise
            same_detections(got[0], eager(model, images, other)[0])


@pytest.mark.slow
def test_inspect_shows_the_part_and_the_transform_sizes(exported):
    _, path = exported
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "the core (backbone and heads), every scale, routed by its 'size' input" in result.output
    assert "transform 320:" in result.output and "transform 256:" in result.output
    assert "exporter:        dynamo" in result.output and "detections matched" in result.output


@pytest.mark.slow
def test_a_per_scale_core_through_the_torchscript_exporter(tmp_path):
    pytest.importorskip("onnxruntime")
    model = detector(TV.ssdlite320_mobilenet_v3_large)
    path = sct.export_onnx(model, tmp_path / "core_256.onnx", 256, part="core", exporter="torchscript")
    meta = read_deploy_metadata(path)
    assert meta["exporter"] == "torchscript" and meta["scale"] == "256" and meta["part"] == "core"
    images = [blobs(hw, 20 + i) for i, hw in enumerate(IMAGES)]
    batch = sct.detector_preprocess(model, images, 256)
    got = sct.detector_postprocess(model, run_core(path, batch, switchable=False), batch)
    for g, w in zip(got, eager(model, images, 256)):
        same_detections(g, w)


@pytest.mark.slow
def test_cli_writes_a_core_and_refuses_part_for_other_formats(tmp_path):
    pytest.importorskip("onnxruntime")
    model = detector(TV.ssdlite320_mobilenet_v3_large)
    src = sct.save(model, tmp_path / "det.safetensors", arch="ssdlite320_mobilenet_v3_large", source="torchvision")
    result = CliRunner().invoke(cli, ["export", str(src), "--format", "pt2", "--part", "core",
                                      "--out", str(tmp_path / "x.pt2")])
    assert result.exit_code != 0 and "--part core is for --format onnx" in result.output
    out = tmp_path / "core_320.onnx"
    result = CliRunner().invoke(cli, ["export", str(src), "--format", "onnx", "--scale", "320", "--part", "core",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "core at scale 320" in result.output and read_deploy_metadata(out)["part"] == "core"
