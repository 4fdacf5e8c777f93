"""Equivalence at conversion, extract, and the model staying the model."""
import copy

import pytest
import timm
import torch
import torchvision
from _util import assert_equivalent, perturb_branches, converted_test_resnet

import sct_convert as sct

TIMM_CASES = [
    ("test_resnet", [96, 64]),
    ("test_efficientnet", [96, 64, 48]),
    ("test_byobnet", [96, 64]),
    ("resnet18", [64, 48, 32]),
    ("mobilenetv3_small_050", [64, 48]),
    ("cspresnet50", [64, 32]),
    ("tresnet_m", [64, 32]),  # space-to-depth stem: routes by the entry layer's own size
]
TV_CASES = [
    ("resnet18", [64, 48, 32]),
    ("mobilenet_v3_small", [64, 48]),
    ("efficientnet_b0", [64, 32]),
    ("densenet121", [64, 32]),
]


def _pairs():
    for name, scales in TIMM_CASES:
        yield pytest.param(lambda n=name: timm.create_model(n), scales, id=f"timm-{name}")
    for name, scales in TV_CASES:
        yield pytest.param(lambda n=name: torchvision.models.get_model(n), scales, id=f"tv-{name}")


@pytest.mark.parametrize("factory,scales", list(_pairs()))
def test_eval_equivalence_and_extract(factory, scales):
    original = factory().eval()
    model = sct.convert(copy.deepcopy(original), scales).eval()
    # the class is a generated subclass of the original's, with the same name
    assert isinstance(model, type(original)) and type(model).__name__ == type(original).__name__
    assert sct.original_class(model) is type(original)
    inputs = {s: torch.randn(2, 3, s, s) for s in scales}
    with torch.no_grad():
        for x in inputs.values():
            assert_equivalent(model(x), original(x))
        perturb_branches(model)
        for s, x in inputs.items():
            plain = sct.extract(model, s).eval()
            assert not any(isinstance(m, sct.ScaleSpecificBatchNorm) for m in plain.modules())
            assert {type(m) for m in plain.modules()} == {type(m) for m in original.modules()}
            assert plain.state_dict().keys() == original.state_dict().keys()
            assert_equivalent(plain(x), model(x))
        # branches differ now, so a wrong route would show
        a, b = scales[0], scales[1]
        with sct.scale(model, b):
            forced = model(inputs[a])
        assert not torch.allclose(forced, model(inputs[a]))


def test_convert_keeps_class_attributes_and_methods():
    model = timm.create_model("test_resnet", num_classes=7)
    cfg = model.pretrained_cfg
    sct.convert(model, [96, 64])
    assert isinstance(model, timm.models.ResNet)
    assert model.pretrained_cfg is cfg and model.default_cfg == cfg and model.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    feats = model.forward_features(x)
    assert model.forward_head(feats).shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.set_grad_checkpointing(True)
    model.train()
    out = model(x)
    assert isinstance(out, sct.ScaleOutputs) and out.scales == (96, 64)
    sum(o.sum() for o in out).backward()
    final, inter = model.forward_intermediates(x)
    assert len(inter) > 0
    # state_dict layout outside the BN branches is unchanged
    plain_keys = set(timm.create_model("test_resnet", num_classes=3).state_dict())
    keys = set(model.state_dict())
    non_bn = {k for k in plain_keys if not any(k.startswith(n + ".") for n in model._sct_context.report.converted)}
    assert non_bn <= keys
    assert all(".branches.96." in k or ".branches.64." in k for k in keys - non_bn)


def test_dropout_and_drop_path_still_act_in_train_mode():
    model = timm.create_model("resnet18", drop_rate=0.5, drop_path_rate=0.5, num_classes=10)
    sct.convert(model, [64, 32])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    for i in range(2):
        assert not torch.allclose(a[i], b[i]), "dropout / drop-path stopped acting in train mode"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_aux_heads_and_training_branches_preserved():
    model = torchvision.models.googlenet(aux_logits=True, init_weights=False, num_classes=5)
    sct.convert(model, [96, 64])
    model.train()
    out = model(torch.randn(2, 3, 96, 96))
    assert [type(o).__name__ for o in out] == ["GoogLeNetOutputs"] * 2
    assert out[1].aux_logits1.shape == (2, 5)
    model.eval()
    assert isinstance(model(torch.randn(2, 3, 96, 96)), torch.Tensor)


def test_features_only_model():
    original = timm.create_model("test_resnet", features_only=True).eval()
    model = sct.convert(copy.deepcopy(original), [96, 64]).eval()
    with torch.no_grad():
        for s in (96, 64):
            x = torch.randn(1, 3, s, s)
            assert_equivalent(model(x), original(x))


def test_forward_and_backward_at_several_sizes():
    model = sct.convert(timm.create_model("test_efficientnet"), [96, 64, 48], sampling=False)
    model.train()
    for s in (96, 64, 48):
        out = model(torch.randn(2, 3, s, s))
        assert isinstance(out, torch.Tensor)
        out.mean().backward()
        assert all(p.grad is not None for p in model.conv_stem.parameters())


def test_deepcopy_keeps_its_own_routing():
    _, model = converted_test_resnet([96, 64])
    ema = copy.deepcopy(model)
    assert ema._sct_context is not model._sct_context
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_equivalent(ema(x), sct.extract(model, 64).eval()(x))
        with sct.scale(model, 96):  # forcing the original forces nothing on the copy
            assert_equivalent(ema(x), sct.extract(model, 64).eval()(x))


class NeedsFrames(torch.nn.Module):
    """A video net whose temporal pooling needs a clip of at least ``frames`` frames (as s3d's)."""

    def __init__(self, frames):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm3d(4)
        self.pool = torch.nn.AvgPool3d((frames, 1, 1))

    def forward(self, x):
        return self.pool(self.bn(self.conv(x))).mean((2, 3, 4))


def test_video_models_are_probed_with_a_clip_length_they_accept():
    model = sct.convert(NeedsFrames(16), [32, 16])
    assert sct.context_of(model).probe_lead == (1, 3, 16)
    model.eval()
    for frames in (16, 20):
        x = torch.randn(2, 3, frames, 16, 16)
        with torch.no_grad():
            assert_equivalent(model(x), sct.extract(model, 16)(x))
    with pytest.raises(sct.ConversionError, match=r"clips of 4, 8, 16, 32 frames were tried.*example_input"):
        sct.convert(NeedsFrames(48), [32, 16])
    model = sct.convert(NeedsFrames(48), [32, 16], example_input=torch.randn(1, 3, 48, 32, 32))
    assert sct.context_of(model).probe_lead == (1, 3, 48)


@pytest.mark.parametrize("scales", [[64], [(64, 48)]])
def test_one_scale_warns_that_it_is_plain_training(scales):
    with pytest.warns(UserWarning, match=r"one scale \((64|64x48)\) is plain training.*224x192, is one non-square scale"):
        model = sct.convert(timm.create_model("test_resnet"), scales)
    assert sct.scales_of(model) == tuple(scales)
