"""A converted model is still a first-class model of its library.

The checks timm and torchvision run on their own models, on a representative set of converted
ones: forward and backward at several sizes, forward_features / forward_head /
forward_intermediates, FX feature extraction (torchvision's and timm's), and torch.jit.script
wherever the original scripts. Branches are perturbed first, so a check that ran the wrong
branch would fail.
"""
import copy
import warnings

import pytest
import timm
import torch
import torchvision
from _util import assert_equivalent, perturb_branches
from timm.models._features_fx import create_feature_extractor as timm_fx
from torchvision.models.feature_extraction import create_feature_extractor as tv_fx
from torchvision.models.feature_extraction import get_graph_node_names

import sct_convert as sct

CASES = [
    ("timm", "test_resnet", [96, 64]),
    ("timm", "test_efficientnet", [96, 64]),
    ("timm", "resnet18", [64, 32]),
    ("timm", "mobilenetv3_small_050", [64, 48]),
    ("torchvision", "resnet18", [64, 32]),
    ("torchvision", "mobilenet_v3_small", [64, 48]),
    ("torchvision", "efficientnet_b0", [64, 32]),
]


def build(source, name):
    torch.manual_seed(0)
    if source == "timm":
        return timm.create_model(name, num_classes=10)
    return torchvision.models.get_model(name, num_classes=10)


def _case(source, name, scales):
    original = build(source, name).eval()
    model = sct.convert(copy.deepcopy(original), scales).eval()
    perturb_branches(model)
    plain = {s: sct.extract(model, s).eval() for s in scales}
    return source, name, scales, model, plain, original


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    return _case(*request.param)


@pytest.fixture(params=[c for c in CASES if c[0] == "timm"], ids=lambda c: f"{c[0]}-{c[1]}")
def timm_case(request):
    return _case(*request.param)


def test_forward_backward_several_sizes(case):
    source, name, scales, model, plain, _ = case
    with torch.no_grad():
        for s in scales:
            x = torch.randn(2, 3, s, s)
            assert_equivalent(model(x), plain[s](x))
    model.train()
    x = torch.randn(2, 3, scales[0], scales[0])
    out = model(x)
    assert out.scales == tuple(scales)
    sct.SCTLoss(torch.nn.CrossEntropyLoss())(out, torch.tensor([1, 2])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_forward_features_head_and_intermediates(timm_case):
    source, name, scales, model, plain, _ = timm_case
    with torch.no_grad():
        for s in scales:
            x = torch.randn(1, 3, s, s)
            feats = model.forward_features(x)
            assert_equivalent(feats, plain[s].forward_features(x))
            assert_equivalent(model.forward_head(feats), plain[s].forward_head(feats))
            got = model.forward_intermediates(x, intermediates_only=True)
            assert_equivalent(got, plain[s].forward_intermediates(x, intermediates_only=True))


def test_fx_feature_extraction_routes_at_run_time(case):
    source, name, scales, model, plain, _ = case
    # nodes inside a BN layer (timm BatchNormAct2d's act) are one routed call once converted
    _, converted_nodes = get_graph_node_names(model)
    _, plain_nodes = get_graph_node_names(plain[scales[0]])
    nodes = [n for n in plain_nodes if n in set(converted_nodes)]
    node, last = nodes[len(nodes) // 2], nodes[-1]
    makers = [tv_fx, timm_fx] if source == "timm" else [tv_fx]
    # Returning the last node too keeps both graphs whole: a truncated graph drops the tail,
    # and with it in-place ops (SiLU(inplace=True)) that modify the node's value in eager.
    for make in makers:
        extractor = make(model, [node, last])
        for s in scales:
            x = torch.randn(1, 3, s, s)
            with torch.no_grad():
                assert_equivalent(extractor(x)[node], make(plain[s], [node, last])(x)[node])


def _scripts(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.jit.script(copy.deepcopy(module))
        except Exception:  # noqa: BLE001 - this only decides whether the check applies
            return False
    return True


def test_jit_script_wherever_the_original_scripts(case):
    source, name, scales, model, plain, original = case
    if not _scripts(original):
        pytest.skip(f"the original {name} does not script")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    assert isinstance(model.forward.__self__, type(model))  # eager model keeps its sampling forward
    with torch.no_grad():
        for s in scales:
            x = torch.randn(2, 3, s, s)
            assert_equivalent(scripted(x), plain[s](x))
