"""Dense prediction: segmentation models train with SCT (torchvision's reference loss, per-pixel
targets matched to each scale), route, and export; outputs reach the criterion as returned."""
import collections
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from _util import TinySegNet, assert_equivalent, perturb_branches
from torchvision import tv_tensors

import sct_convert as sct
from sct_convert.training.dense import resize_target

SCALES = [64, 48, 32]


def reference_criterion(inputs, target):
    """torchvision references/segmentation/train.py's criterion, verbatim in substance."""
    losses = {name: F.cross_entropy(x, target, ignore_index=255) for name, x in inputs.items()}
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


def labels(n=2, size=64, classes=4):
    y = torch.randint(0, classes, (n, size, size))
    y[:, :5] = 255  # torchvision's ignore_index: a border that must stay ignored at every scale
    return y


def mask_resize(y, size):
    """How torchvision's v2 transforms resize a segmentation mask (its reference's tensor path)."""
    return torchvision.transforms.v2.functional.resize(tv_tensors.Mask(y), [size, size]).as_subclass(torch.Tensor)


@pytest.mark.parametrize("size", [48, 32, 21, 80])
def test_label_maps_resize_as_torchvision_resizes_masks_keeping_ignore_index(size):
    y = labels()
    got = resize_target(y, (size, size))
    assert got.dtype == y.dtype and got.shape == (2, size, size)
    assert torch.equal(got, mask_resize(y, size))
    assert set(got.unique().tolist()) == set(y.unique().tolist())  # no blended labels; 255 kept


def test_soft_per_pixel_targets_keep_probabilities():
    soft = torch.randn(2, 5, 64, 64).softmax(1)
    for size in [(32, 32), (48, 40), (96, 96)]:
        got = resize_target(soft, size)
        assert got.shape == (2, 5, *size)
        assert got.min() >= 0 and torch.allclose(got.sum(1), torch.ones(2, *size), atol=1e-5)


SEGMENTATION = {
    "fcn_resnet50": dict(aux_loss=True),
    "deeplabv3_resnet50": dict(aux_loss=True),
    "deeplabv3_mobilenet_v3_large": dict(aux_loss=True),
    "lraspp_mobilenet_v3_large": {},
}


@pytest.mark.parametrize("name", list(SEGMENTATION))
def test_torchvision_segmentation_trains_with_its_reference_loss(name):
    builder = getattr(torchvision.models.segmentation, name)
    model = sct.convert(builder(weights=None, weights_backbone=None, num_classes=4, **SEGMENTATION[name]),
                        SCALES).train()
    x, y = torch.randn(2, 3, 64, 64), labels()
    outputs = model(x)
    assert outputs.scales == tuple(SCALES)
    assert [o["out"].shape[-1] for o in outputs] == SCALES  # torchvision upsamples to each scale's input
    criterion = sct.SCTLoss(reference_criterion)
    loss = criterion(outputs, y)
    expected = sum(reference_criterion(o, mask_resize(y, s)) for o, s in zip(outputs, SCALES)) / 3
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for layer_name, layer in sct.scale_specific_layers(model):
        for key, branch in layer.branches.items():
            if branch.weight is not None:
                assert branch.weight.grad is not None, f"{layer_name} branch {key} got no gradient"


def test_upsampling_outputs_to_the_target_instead():
    model = sct.convert(TinySegNet(), SCALES).train()
    x, y = torch.randn(2, 3, 64, 64), labels()
    # the encoder-decoder predicting at 1/4 of the input is where the two options differ
    model_quarter = sct.convert(torch.nn.Sequential(*TinySegNet().encoder, torch.nn.Conv2d(16, 4, 1)),
                                SCALES).train()
    outputs = model_quarter(x)
    loss = sct.SCTLoss(torch.nn.CrossEntropyLoss(ignore_index=255), match="output")(outputs, y)
    up = [F.interpolate(o, size=(64, 64), mode="bilinear", align_corners=False) for o in outputs]
    torch.testing.assert_close(loss, sum(F.cross_entropy(u, y, ignore_index=255) for u in up) / 3)
    by_target = sct.SCTLoss(torch.nn.CrossEntropyLoss(ignore_index=255))(outputs, y)
    assert [o.shape[-1] for o in outputs] == [16, 12, 8]
    torch.testing.assert_close(by_target, sum(
        F.cross_entropy(o, mask_resize(y, s // 4), ignore_index=255) for o, s in zip(outputs, SCALES)) / 3)
    with pytest.raises(ValueError, match="match='pixels'"):
        sct.SCTLoss(torch.nn.CrossEntropyLoss(), match="pixels")
    assert sct.SCTLoss(reference_criterion)(model(x), y).requires_grad


def test_train_step_equals_the_drop_in_loop_on_a_segmentation_model():
    torch.manual_seed(0)
    a = sct.convert(TinySegNet(), SCALES).train()
    b = sct.convert(TinySegNet(), SCALES).train()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(2, 3, 64, 64), labels()
    criterion = sct.SCTLoss(reference_criterion)
    criterion(a(x), y).backward()
    opt = torch.optim.SGD(b.parameters(), lr=0.0)  # lr 0: compare the gradients it leaves
    result = sct.train_step(b, x, y, criterion, opt)
    assert set(result.per_scale) == set(SCALES)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


Pair = collections.namedtuple("Pair", "mask edges")


@dataclasses.dataclass
class Prediction:
    mask: torch.Tensor
    score: torch.Tensor


class MultiOutput(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = TinySegNet(num_classes=3)

    def forward(self, x):
        out = self.body(x)["out"]
        if self.kind == "namedtuple":
            return Pair(out, out[:, :1])
        if self.kind == "dataclass":
            return Prediction(out, out.mean((1, 2, 3)))
        return [out, out.mean((2, 3))]


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass", "list"])
def test_outputs_reach_the_criterion_as_the_model_returns_them(kind):
    model = sct.convert(MultiOutput(kind), SCALES).train()
    seen = []

    def criterion(output, target):
        seen.append(output)
        mask = output[0] if isinstance(output, (list, tuple)) else output.mask
        return F.cross_entropy(mask, target, ignore_index=255)

    loss = sct.SCTLoss(criterion)(model(torch.randn(2, 3, 64, 64)), labels(classes=3))
    loss.backward()
    assert len(seen) == 3 and all(type(o) is type(seen[0]) for o in seen)
    assert type(seen[0]).__name__ == {"namedtuple": "Pair", "dataclass": "Prediction", "list": "list"}[kind]
    with pytest.raises(TypeError, match="distillation needs the model's logits"):
        sct.SCTLoss(criterion, distill="inplace")(model(torch.randn(2, 3, 64, 64)), labels(classes=3))


class FeaturesHead(torch.nn.Module):
    """A user's head on a timm features_only backbone: upsample each level, add, classify."""

    def __init__(self, backbone_name="resnet18", classes=4):
        super().__init__()
        self.backbone = timm.create_model(backbone_name, features_only=True, out_indices=(1, 2, 3))
        self.lateral = torch.nn.ModuleList(torch.nn.Conv2d(c, 16, 1) for c in self.backbone.feature_info.channels())
        self.classify = torch.nn.Sequential(torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, classes, 1))

    def forward(self, x):
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        fused = sum(F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
                    for lat, f in zip(self.lateral, feats))
        return F.interpolate(self.classify(fused), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_timm_features_only_backbone_with_a_head_trains_routes_and_exports_per_scale(tmp_path):
    model = sct.convert(FeaturesHead(), SCALES)
    model.train()
    x, y = torch.randn(2, 3, 64, 64), labels()
    sct.SCTLoss(torch.nn.CrossEntropyLoss(ignore_index=255))(model(x), y).backward()
    # the backbone alone: its output is a list of feature maps, handed to the criterion as a list
    backbone = sct.convert(timm.create_model("resnet18", features_only=True, out_indices=(1, 2)), SCALES).train()
    seen = []
    sct.SCTLoss(lambda feats, t: seen.append(len(feats)) or sum(f.mean() for f in feats))(backbone(x), y)
    assert seen == [2, 2, 2]
    model.eval()
    perturb_branches(model)
    paths = sct.save_per_scale(model, tmp_path, arch="seg")
    for s, path in zip(SCALES, paths):
        plain = sct.load_plain(FeaturesHead().eval(), path)
        xs = torch.randn(2, 3, s, s)
        with torch.no_grad():
            assert_equivalent(model(xs), plain(xs))


@pytest.mark.slow
def test_segmentation_model_exports_onnx_and_torch_export_serving_every_scale(tmp_path):
    pytest.importorskip("onnxruntime")
    from sct_convert.deploy.api import onnx_max_relative_error

    model = sct.convert(TinySegNet(), SCALES).eval()
    perturb_branches(model)
    sizes = [(s, s) for s in SCALES] + [(56, 56)]  # every trained scale and one in between
    switchable = sct.export_onnx(model, tmp_path / "seg.onnx")
    assert max(onnx_max_relative_error(model, switchable, sizes)) < 1e-4  # "out" and "aux" both
    per_scale = sct.export_onnx(model, tmp_path / "seg_48.onnx", 48)
    assert max(onnx_max_relative_error(model, per_scale, [(48, 48)])) < 1e-4
    program = torch.export.load(sct.export_program(model, tmp_path / "seg.pt2")).module()
    one = torch.export.load(sct.export_program(model, tmp_path / "seg_32.pt2", 32)).module()
    with torch.no_grad():
        for hw in sizes:
            x = torch.randn(2, 3, *hw)
            assert_equivalent(program(x), model(x), rel=1e-4)
        x = torch.randn(3, 3, 32, 32)
        assert_equivalent(one(x), model(x), rel=1e-4)
