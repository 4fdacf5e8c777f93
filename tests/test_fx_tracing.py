"""A converted model traced with torch.fx is the eager model: it samples in train mode, routes
in eval mode, and the traced graph scripts. Checked with torch.fx's own tracer and with one that
keeps timm's no-trace modules as leaves (as timm's FX feature extraction does), on one model of
each family."""
import warnings

import pytest
import timm
import torch
import torch.fx
from _util import perturb_branches
from timm.layers import get_notrace_functions, get_notrace_modules

import sct_convert as sct

FAMILIES = ["test_resnet", "test_efficientnet", "mobilenetv3_small_050", "regnetx_002",
            "densenet121", "hrnet_w18_small", "cspresnet50", "dpn68"]
SCALES = [64, 32]


class TimmLeafTracer(torch.fx.Tracer):
    """torch.fx with timm's registered no-trace modules and functions as leaves."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m, name):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, name)


def _trace(model, tracer):
    return torch.fx.GraphModule(model, tracer().trace(model))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tracer", [torch.fx.Tracer, TimmLeafTracer], ids=["fx", "timm-leaves"])
def test_traced_model_samples_in_train_routes_in_eval_and_scripts(name, tracer):
    model = sct.convert(timm.create_model(name, num_classes=4), SCALES)
    perturb_branches(model)

    traced = _trace(model.train(), tracer)
    out = traced(torch.randn(2, 3, 64, 64))
    assert isinstance(out, sct.ScaleOutputs) and out.scales == tuple(SCALES)
    sct.SCTLoss(torch.nn.CrossEntropyLoss())(out, torch.tensor([0, 1])).backward()
    no_grad = [n for n, p in traced.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"no gradient for {no_grad[:3]}"

    model.eval()
    traced = _trace(model, tracer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(traced)
    with torch.no_grad():
        for s in SCALES:
            x = torch.randn(1, 3, s, s)
            expected = model(x)
            assert torch.equal(traced(x), expected), s
            assert torch.equal(scripted(x), expected), s
