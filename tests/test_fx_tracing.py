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
@pytest.mark.slow
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


def _timm_fx_model(model, train):
    """What timm's tests/test_models.py builds (``_create_fx_model``): torchvision's FX feature
    extractor returning the nodes that feed the traced graph's output."""
    from torchvision.models.feature_extraction import (
        NodePathTracer, create_feature_extractor, get_graph_node_names)

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**tracer_kwargs).trace(model).nodes))
        names = [n.name for n in graph_nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in graph_nodes[0]._input_nodes]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_timm_test_models_backward_fx_on_a_converted_model(name):
    # timm's test_model_backward_fx: torch.cat the extractor's outputs, every parameter gets a gradient
    model = sct.convert(timm.create_model(name, num_classes=42), SCALES).train()
    num_params = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fx = _timm_fx_model(model, train=True)
    outputs = tuple(fx(torch.randn(2, 3, 64, 64)).values())
    outputs = torch.cat(outputs)  # ScaleOutputs: every scale's output, concatenated
    assert outputs.shape == (2 * len(SCALES), 42)
    outputs.mean().backward()
    assert num_params == sum(p.grad.numel() for p in fx.parameters() if p.grad is not None)
    with pytest.raises(TypeError, match="ScaleOutputs.*SCTLoss"):
        torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.zeros(2, dtype=torch.long))


def test_train_mode_graph_tells_batch_norms_inside_leaf_modules_each_scale():
    # like timm's MobileViT / EfficientViT blocks, which timm's tracer keeps as leaves
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 3, 1)
            self.stem_bn = torch.nn.BatchNorm2d(3)
            self.block = Block()

        def forward(self, x):
            return self.block(self.stem_bn(self.stem(x))).mean((2, 3))

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Block) or super().is_leaf_module(m, name)

    model = sct.convert(Net(), SCALES).train()
    traced = torch.fx.GraphModule(model, LeafTracer().trace(model))
    out = traced(torch.randn(2, 3, 64, 64))
    assert isinstance(out, sct.ScaleOutputs) and out.scales == tuple(SCALES)
    sum(o.sum() for o in out).backward()
    for key in ("64", "32"):
        assert model.block.bn.branches[key].weight.grad is not None, key
