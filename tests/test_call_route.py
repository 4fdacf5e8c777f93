"""The call route: one order of precedence for every way a call is made.

``train_step`` runs exactly the sizes it reports, equal to the drop-in forward, on every model
kind (a classifier, a segmentation model, a detector whose transform resizes), with between-size
sampling on; and pins carry a size as well as a branch.
"""
import pytest
import timm
import torch
import torchvision
from _util import TinySegNet

import sct_convert as sct


def _seen(module):
    """Sizes of what reaches ``module`` (its first input's last two dims), in call order."""
    sizes = []
    module.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    return sizes


def _classifier():
    model = sct.convert(timm.create_model("test_resnet", num_classes=4), [64, 32])
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2,))
    return model, model.conv1[0] if isinstance(model.conv1, torch.nn.Sequential) else model.conv1, x, y, \
        sct.SCTLoss(torch.nn.CrossEntropyLoss())


def _segmenter():
    model = sct.convert(TinySegNet(), [64, 32])
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    return model, model.encoder[0][0], x, y, sct.SCTLoss(lambda out, t: torch.nn.functional.cross_entropy(out["out"], t))


def _detector():
    torch.manual_seed(0)
    plain = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3)
    model = sct.convert(plain, [192, 144])  # the case: SSDlite at 192 / 144
    images = [torch.rand(3, 150, 200), torch.rand(3, 180, 140)]
    targets = [{"boxes": torch.tensor([[10.0, 15.0, 90.0, 100.0]]), "labels": torch.tensor([1])} for _ in images]
    return model, model.backbone, images, targets, None


def _reported(out):
    return list(out.per_scale) if isinstance(out, dict) else list(out.scales)


@pytest.mark.parametrize("build", [_classifier, _segmenter, _detector], ids=["classifier", "segmentation", "detector"])
def test_train_step_runs_the_sizes_it_reports_like_the_drop_in_forward(build):
    model, first, x, y, criterion = build()
    sct.set_sampling(model, between=True)
    seen = _seen(first)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: both runs see one model
    for seed in range(3):
        torch.manual_seed(seed)
        out = model(x, y) if criterion is None else model(x)
        drop_in, drop_in_seen = _reported(out), list(seen)
        seen.clear()
        torch.manual_seed(seed)
        step = sct.train_step(model, x, y, criterion, optimizer)
        assert list(step.per_scale) == drop_in  # the same scales, the in-between one included
        assert len(drop_in) == 3 and drop_in[2] not in sct.scales_of(model)
        assert list(seen) == drop_in_seen  # the layer saw the same sizes in both
        assert list(seen) == [(s, s) if isinstance(s, int) else s for s in drop_in]  # ... the reported ones
        seen.clear()


def test_a_detector_pinned_by_sct_scale_resizes_to_the_pin_and_runs_its_branch():
    model, backbone, images, _, _ = _detector()
    seen = _seen(backbone)
    model.eval()
    with torch.no_grad(), sct.scale(model, 144):
        model(images)
    assert seen == [(144, 144)]
    with torch.no_grad():
        model(images)  # no pin: the transform's own size (320) routes, to the nearest branch
    assert seen[-1] == (320, 320)
