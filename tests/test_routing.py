"""Input size picks the branch: exact first, nearest by pixel count, or an error; and overrides."""
import warnings

import pytest
import torch
from _util import ConvBN, HeadOnlyBN, perturb_branches, converted_test_resnet

import sct_convert as sct


Net = ConvBN


def routed(model, h, w=None):
    """Key of the branch that served a forward at (h, w), told apart by its output."""
    model.eval()
    if not getattr(model, "_perturbed", False):
        perturb_branches(model)  # branches must differ for outputs to say which one ran
        model._perturbed = True
    x = torch.randn(1, 3, h, w or h)
    ctx = sct.context_of(model)
    with torch.no_grad():
        out = model(x)
        served = []
        for s, key in zip(ctx.scales, ctx.keys):
            with sct.scale(model, s):
                if torch.equal(out, model(x)):
                    served.append(key)
    assert len(served) == 1, served
    return served[0]


def test_exact_match_including_rectangular_scales():
    model = sct.convert(Net(), [32, (24, 16), 16])
    assert sct.scales_of(model) == (32, (24, 16), 16)
    assert routed(model, 32) == "32"
    assert routed(model, 24, 16) == "24x16"
    assert routed(model, 16) == "16"


def test_nearest_by_pixel_count_warns_once_per_size():
    model = sct.convert(Net(), [32, 16])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert routed(model, 28) == "32"   # 784 px: nearer 1024 than 256
        assert routed(model, 20) == "16"   # 400 px: nearer 256 than 1024
        assert routed(model, 28) == "32"
    texts = [str(w.message) for w in caught if "not a trained scale" in str(w.message)]
    assert len(texts) == 2 and "(28, 28)" in texts[0]


def test_unknown_scale_error_policy():
    model = sct.convert(Net(), [32, 16], unknown_scale="error")
    assert routed(model, 16) == "16"
    with pytest.raises(ValueError, match=r"\(20, 20\) matches none.*sct.scale"):
        routed(model, 20)
    with pytest.raises(ValueError, match="unknown_scale"):
        sct.convert(Net(), [32], unknown_scale="closest")


def test_scale_context_manager_overrides_and_restores():
    model = sct.convert(Net(), [32, 16]).eval()
    perturb_branches(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with sct.scale(model, 16):
            assert routed(model, 32) == "16"
            forced = model(x)
        assert routed(model, 32) == "32"
        plain16 = sct.extract(model, 16).eval()
        assert torch.allclose(forced, plain16(x))
        with sct.scale(model, 16), sct.scale(model, 32):
            assert routed(model, 16) == "32"
        assert routed(model, 16) == "16"
    with pytest.raises(ValueError, match="not one of this model's scales"):
        with sct.scale(model, 48):
            pass


@pytest.mark.parametrize("bad,match", [
    ([], "empty"),
    ([32, 32], "duplicate"),
    ([32, (32, 32)], "duplicate"),
    ([32, 0], "positive"),
    ([32, -8], "positive"),
    ([32, 16.0], "invalid scale"),
    ([32, "16"], "invalid scale"),
    ([32, True], "invalid scale"),
    ([(32, 16, 8)], "invalid scale"),
    ("224", "list"),
    (224, "list"),
])
def test_bad_scales_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        sct.convert(Net(), bad)


def test_not_converted_model_is_a_clear_error():
    with pytest.raises(ValueError, match="not a converted model"):
        sct.scales_of(Net())


def test_routing_survives_torchvision_and_timm_fx_feature_extraction():
    from timm.models._features_fx import create_feature_extractor as timm_fx
    from torchvision.models.feature_extraction import create_feature_extractor as tv_fx

    _, model = converted_test_resnet([96, 64])
    for extractor in (tv_fx(model, ["layer2"]), timm_fx(model, ["layer2"])):
        for s in (96, 64):
            x = torch.randn(1, 3, s, s)
            with torch.no_grad():
                expected = sct.extract(model, s).eval().forward_intermediates(x, indices=[2], intermediates_only=True)[0]
                got = extractor(x)["layer2"]
            assert torch.allclose(got, expected, atol=1e-5)


def test_entry_is_the_first_bn_else_the_first_layer_that_can_tell_scales_apart():
    model = sct.convert(Net(), [32, 16])
    assert model._sct_context.entry_name == "bn"
    assert model._sct_context.hook_id in model.bn._forward_pre_hooks

    model = sct.convert(HeadOnlyBN(), [32, 16])
    assert model._sct_context.entry_name == "conv" and model._sct_context.hook_id is not None
    assert routed(model, 16) == "16" and routed(model, 32) == "32"
    plain = sct.extract(model, 16)
    assert not plain.conv._forward_pre_hooks and model.conv._forward_pre_hooks
