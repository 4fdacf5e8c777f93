"""torchvision detection models: the scale is the size the model's transform resizes to; eval
routes by it, sct.scale sets it, train mode returns torchvision's dict of losses (Eq. 1 over the
scales), frozen batch norms stay frozen per scale, and per-scale checkpoints are the plain model."""
import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from _util import perturb_branches
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import sct_convert as sct

SCALES = [160, 128]
TV = torchvision.models.detection
DETECTORS = {  # builder, keyword arguments (FCOS: keep low scores, a random head scores low)
    "fasterrcnn_mobilenet_v3_large_320_fpn": (TV.fasterrcnn_mobilenet_v3_large_320_fpn, {}),
    "retinanet_resnet50_fpn": (TV.retinanet_resnet50_fpn, {}),
    "fcos_resnet50_fpn": (TV.fcos_resnet50_fpn, {"score_thresh": 0.0}),
    "maskrcnn_resnet50_fpn": (TV.maskrcnn_resnet50_fpn, {}),
    "ssdlite320_mobilenet_v3_large": (TV.ssdlite320_mobilenet_v3_large, {}),
}


def build(name):
    torch.manual_seed(0)
    builder, kwargs = DETECTORS[name]
    return builder(weights=None, weights_backbone=None, num_classes=3, **kwargs)


def images_and_targets(masks=False):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 150, 200, generator=g), torch.rand(3, 180, 140, generator=g)]
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        target = {"boxes": torch.tensor([[10.0, 15.0, 90.0, 100.0], [40.0, 30.0, w - 5.0, h - 8.0]]),
                  "labels": torch.tensor([1, 2])}
        if masks:
            target["masks"] = torch.zeros(2, h, w, dtype=torch.uint8)
            target["masks"][0, 15:100, 10:90] = 1
            target["masks"][1, 30:, 40:] = 1
        targets.append(target)
    return images, targets


def same_detections(a, b):
    assert len(a) == len(b) and sum(len(x["boxes"]) for x in a) > 0  # something to compare
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], msg=k)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_serves_each_scale_by_its_transforms_size(name):
    model = sct.convert(build(name), SCALES).eval()
    perturb_branches(model)  # a wrong branch would show in the detections
    images, _ = images_and_targets()
    size_attr = "fixed_size" if model.transform.fixed_size else "min_size"
    for s in SCALES:
        plain = sct.extract(model, s).eval()  # the original class, resizing to s
        assert type(plain.transform) is torchvision.models.detection.transform.GeneralizedRCNNTransform
        with torch.no_grad():
            want = plain(images)
            with sct.scale(model, s):  # sets the branch and the transform's size
                same_detections(model(images), want)
            setattr(model.transform, size_attr, (s, s) if size_attr == "fixed_size" else (s,))
            if size_attr == "min_size":
                model.transform.max_size = plain.transform.max_size
            same_detections(model(images), want)  # the transform's own size picks the branch
    assert sct.route(model, SCALES[0]) == SCALES[0]


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_reference_training_loop_gets_the_losses_of_every_scale(name):
    model = sct.convert(build(name), SCALES).train()
    images, targets = images_and_targets(masks=name.startswith("mask"))
    torch.manual_seed(0)
    loss_dict = model(images, targets)  # torchvision's reference loop, unchanged
    losses = sum(loss for loss in loss_dict.values())
    assert set(loss_dict.per_scale) == set(SCALES)
    torch.manual_seed(0)  # the same draws (proposal sampling), one scale at a time
    manual = []
    for s in SCALES:
        with sct.scale(model, s):
            manual.append(model(images, targets))
    for key in loss_dict:
        torch.testing.assert_close(loss_dict[key], sum(m[key] for m in manual) / 2, msg=key)
        assert key in loss_dict.per_scale[128]
    losses.backward()
    grads = {key: branch.weight.grad for _, layer in sct.scale_specific_layers(model)
             for key, branch in layer.branches.items() if getattr(branch, "weight", None) is not None}
    assert grads and all(g is not None for g in grads.values())  # every scale's branches trained


@pytest.mark.slow
def test_train_step_holds_one_scale_at_a_time_with_the_models_own_losses():
    a = sct.convert(build("fasterrcnn_mobilenet_v3_large_320_fpn"), SCALES).train()
    b = sct.convert(build("fasterrcnn_mobilenet_v3_large_320_fpn"), SCALES).train()
    b.load_state_dict(a.state_dict())
    images, targets = images_and_targets()
    torch.manual_seed(0)
    sum(a(images, targets).values()).backward()
    torch.manual_seed(0)
    result = sct.train_step(b, images, targets, None, torch.optim.SGD(b.parameters(), lr=0.0))
    assert set(result.per_scale) == set(SCALES)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def frozen_faster_rcnn():
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(backbone, trainable_layers=3)
    return FasterRCNN(backbone, num_classes=3, min_size=160, max_size=320, box_score_thresh=0.0)


@pytest.mark.slow
def test_frozen_batch_norms_stay_frozen_per_scale_and_calibrate_per_scale(tmp_path):
    model = sct.convert(frozen_faster_rcnn(), SCALES)
    frozen = [(n, layer) for n, layer in sct.scale_specific_layers(model)
              if isinstance(layer.branches["160"], FrozenBatchNorm2d)]
    assert frozen, "the backbone's FrozenBatchNorm2d layers are branched"
    before = {n: layer.branches["128"].running_mean.clone() for n, layer in frozen}
    model.train()
    images, targets = images_and_targets()
    sum(model(images, targets).values()).backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert all(torch.equal(before[n], layer.branches["128"].running_mean) for n, layer in frozen)
    assert not any(p.requires_grad for _, layer in frozen for p in layer.parameters())
    batches = [torch.rand(2, 3, 160, 160) for _ in range(2)]  # unlabeled images
    sct.calibrate(model, batches, num_batches=2, progress=False)
    name, layer = frozen[0]
    assert not torch.equal(before[name], layer.branches["128"].running_mean)  # re-estimated
    assert not torch.equal(layer.branches["160"].running_mean, layer.branches["128"].running_mean)
    paths = sct.save_per_scale(model.eval(), tmp_path, arch="frcnn")
    plain = frozen_faster_rcnn().eval()
    for s, path in zip(SCALES, paths):
        sct.load_plain(plain, path)  # strict: the plain architecture
        plain.transform.min_size, plain.transform.max_size = (s,), 2 * s
        with torch.no_grad(), sct.scale(model, s):
            same_detections(model(images), plain(images))


def test_a_user_built_detector_converts_and_per_scale_files_load_strictly(tmp_path):
    model = sct.convert(build("fasterrcnn_mobilenet_v3_large_320_fpn"), SCALES).eval()
    perturb_branches(model)
    paths = sct.save_per_scale(model, tmp_path, arch="frcnn")
    plain = sct.load_plain(build("fasterrcnn_mobilenet_v3_large_320_fpn").eval(), paths[1])
    images, _ = images_and_targets()
    plain.transform.min_size, plain.transform.max_size = (128,), 256
    with torch.no_grad(), sct.scale(model, 128):
        same_detections(model(images), plain(images))



def test_torch_export_program_where_torchvisions_own_model_exports_else_one_line_naming_the_upstream_limit(tmp_path):
    model = sct.convert(build("ssdlite320_mobilenet_v3_large"), SCALES).eval()
    plain = sct.extract(model, 160)
    try:
        torch.export.export(plain, (torch.rand(2, 3, 160, 160),), strict=False)
    except Exception:  # noqa: BLE001 - torchvision's own model cannot be exported with this torch
        upstream = True
    else:
        upstream = False
    if upstream:
        with pytest.raises(ValueError, match=r"cannot trace torchvision's plain SSD .* the limit is upstream"):
            sct.export_program(model, tmp_path / "m.pt2")
        assert list(tmp_path.iterdir()) == []
    else:  # the day torchvision's model exports, ours must too
        assert sct.export_program(model, tmp_path / "m.pt2").is_file()


def test_cli_builds_detectors_by_name_and_their_files_load(tmp_path):
    from click.testing import CliRunner

    from sct_convert.cli import cli

    out = tmp_path / "ssd.safetensors"
    r = CliRunner().invoke(cli, ["ssdlite320_mobilenet_v3_large", "--scales", "320,256", "--num-classes", "3",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    model = sct.load(out).eval()  # rebuilt offline: the class count read from the SSD head
    assert model.head.classification_head.num_columns == 3 and sct.context_of(model).resizer == "transform"
    r = CliRunner().invoke(cli, ["export", str(out), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    if r.exit_code != 0:  # torchvision's own SSD does not trace with this torch: one line says so
        assert len(r.output.strip().splitlines()) == 1 and "the limit is upstream" in r.output, r.output


def test_scripting_a_detector_gives_the_branch_its_transform_serves_and_says_so():
    model = sct.convert(build("fasterrcnn_mobilenet_v3_large_320_fpn"), SCALES).eval()
    perturb_branches(model)
    images, _ = images_and_targets()
    model.transform.min_size = (140,)  # between the scales: the nearest branch, 128, at 140
    for pin, branch in ((None, 128), (160, 160)):  # then an sct.scale pin: branch 160 at 160
        with sct.scale(model, pin) if pin else contextlib.nullcontext():
            with pytest.warns(UserWarning, match=f"a scripted detector serves one branch: {branch}"):
                scripted = torch.jit.script(model)
            with torch.no_grad():
                eager = model(images)
        with torch.no_grad():  # torchvision's scripted detectors return (losses, detections)
            same_detections(scripted(images)[1], eager)
    model.transform.min_size = (160,)
    interpolating = sct.convert(build("fasterrcnn_mobilenet_v3_large_320_fpn"), SCALES, "interpolate").eval()
    interpolating.transform.min_size = (144,)
    with pytest.raises(sct.ConversionError, match=r"between two scales.*sct.extract\(model, s\)"):
        torch.jit.script(interpolating)


def test_a_converted_detector_pickles_and_deep_copies():
    import copy
    import io

    model = sct.convert(build("ssdlite320_mobilenet_v3_large"), SCALES).eval()
    perturb_branches(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    images, _ = images_and_targets()
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert sct.context_of(other) is other.transform._sct_context  # one context, as in the model
        with torch.no_grad(), sct.scale(model, 128), sct.scale(other, 128):
            same_detections(other(images), model(images))


def test_threads_serving_different_scales_of_one_detector_get_their_own():
    from concurrent.futures import ThreadPoolExecutor

    model = sct.convert(build("ssdlite320_mobilenet_v3_large"), SCALES).eval()
    perturb_branches(model)
    images, _ = images_and_targets()
    with torch.no_grad():
        want = {}
        for s in SCALES:
            with sct.scale(model, s):
                want[s] = model(images)

    def serve(s):
        with torch.no_grad(), sct.scale(model, s):  # the pin (and the size) hold for this thread only
            return s, model(images)

    with ThreadPoolExecutor(4) as pool:
        for s, got in pool.map(serve, SCALES * 4):
            same_detections(got, want[s])


def test_the_examples_map_scores_perfect_detections_100_and_misses_lower():
    pytest.importorskip("torchmetrics")
    pytest.importorskip("pycocotools")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import detection_sct

    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [70.0, 20.0, 100.0, 40.0]]),
                "labels": torch.tensor([3, 5])}]

    class Oracle(torch.nn.Module):  # returns fixed detections as torchvision's eval output
        def __init__(self, detections):
            super().__init__()
            self.detections = detections

        def forward(self, images):
            return self.detections

    perfect = [{"boxes": targets[0]["boxes"], "labels": targets[0]["labels"], "scores": torch.tensor([0.9, 0.8])}]
    assert detection_sct.mean_ap_50(Oracle(perfect), [torch.zeros(3, 128, 128)], targets) == pytest.approx(100.0)
    # class 5 missed (AP 0), class 3 found (AP 1); class 6, with no true box, is not averaged (COCO)
    wrong_class = [{**perfect[0], "labels": torch.tensor([3, 6])}]
    assert detection_sct.mean_ap_50(Oracle(wrong_class), [torch.zeros(3, 128, 128)], targets) == pytest.approx(50.0)
