"""Every place a batch norm is applied becomes scale-specific, or the conversion says why not."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from _util import assert_equivalent, perturb_branches
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn

import sct_convert as sct


class Tiny(nn.Module):
    def __init__(self, norm2d=None, head_norm=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = norm2d if norm2d is not None else nn.BatchNorm2d(8)
        self.head_norm = head_norm if head_norm is not None else nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        return self.fc(self.head_norm(x.mean((2, 3))))


def _check_all_branched(model, scales, x_sizes=None):
    original = copy.deepcopy(model).eval()
    sct.convert(model, scales).eval()
    remaining = [n for n, m in model.named_modules() if sct.is_batch_norm(m)
                 and ".branches." not in n]
    assert remaining == []
    with torch.no_grad():
        for s in scales:
            x = torch.randn(2, 3, s, s)
            assert_equivalent(model(x), original(x))
    return model


@pytest.mark.parametrize("norm", [
    nn.BatchNorm2d(8),
    nn.SyncBatchNorm(8),
    BatchNormAct2d(8, act_layer=nn.GELU, drop_layer=lambda: nn.Dropout(0.1)),
    SyncBatchNormAct(8),
    torchvision.ops.FrozenBatchNorm2d(8),
    FrozenBatchNormAct2d(8),
], ids=lambda m: type(m).__name__)
def test_norm_types_are_branched(norm):
    model = _check_all_branched(Tiny(norm), [32, 16])
    branch = model.bn.branches["16"]
    assert type(branch) is type(norm)
    if isinstance(norm, BatchNormAct2d):
        assert isinstance(branch.act, nn.GELU) and isinstance(branch.drop, nn.Dropout)


def test_frozen_batch_norm_branches_stay_frozen():
    model = _check_all_branched(Tiny(torchvision.ops.FrozenBatchNorm2d(8)), [32, 16])
    assert all(not p for p in (dict(b.named_parameters()) for b in model.bn.branches.values()))
    assert set(model.bn.branches["16"].state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_batchnorm1d_and_3d():
    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm3d(4)
            self.head = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).mean((2, 3, 4)))

    model = Video()
    original = copy.deepcopy(model).eval()
    sct.convert(model, [32, 16]).eval()
    assert isinstance(model.bn, sct.ScaleSpecificBatchNorm) and isinstance(model.head, sct.ScaleSpecificBatchNorm)
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        assert_equivalent(model(x), original(x))


@pytest.mark.parametrize("norm", [
    nn.BatchNorm2d(8),
    nn.BatchNorm2d(8, affine=False),
    nn.BatchNorm2d(8, momentum=None),
    nn.BatchNorm2d(8, track_running_stats=False),
    BatchNormAct2d(8, act_layer=nn.Hardswish),
    BatchNormAct2d(8, affine=False),
], ids=["affine", "no-affine", "momentum-None", "batch-stats", "timm-act", "timm-act-no-affine"])
def test_eval_shortcut_matches_the_branch_forward_bit_for_bit(norm):
    # In eval mode S-BN calls F.batch_norm itself for plain BNs (inference is Python-bound on
    # small GPU batches); it must compute exactly what the branch's own forward does.
    model = sct.convert(Tiny(norm), [32, 16]).eval()
    perturb_branches(model)
    sbn = model.bn
    for key, s in (("32", 32), ("16", 16)):
        h = torch.randn(2, 8, s, s)
        with torch.no_grad(), sct.scale(model, s):
            assert torch.equal(sbn(h), sbn.branches[key].forward(h))
    with sct.scale(model, 32), pytest.raises((ValueError, AssertionError), match="expected 4D input"):
        sbn(torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="without a route"):  # the pin ended with its block
        sbn(torch.randn(8, 4))

    def branch_forward_called(x):
        raise AssertionError("branch forward called")

    sbn.branches["32"].forward = branch_forward_called
    h = torch.randn(2, 8, 32, 32)
    with torch.no_grad(), sct.scale(model, 32):
        if norm.track_running_stats:  # the shortcut is taken
            sbn(h)
        else:  # batch statistics in eval mode: the branch's own forward
            with pytest.raises(AssertionError, match="branch forward called"):
                sbn(h)
    del sbn.branches["32"].forward
    # train mode runs the branch's forward: batch statistics, running stats updated
    model.train()
    sct.set_sampling(model, False)
    before = sbn.branches["32"].num_batches_tracked.clone() if norm.track_running_stats else None
    model(torch.randn(2, 3, 32, 32))
    if before is not None:
        assert int(sbn.branches["32"].num_batches_tracked) == int(before) + 1


def test_bn_called_at_two_places_is_one_branched_layer():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            x = self.bn(self.conv1(x)).relu()
            return self.bn(self.conv2(x)).mean((2, 3))

    model = _check_all_branched(Shared(), [32, 16])
    assert model._sct_context.report.call_sites == {"bn": 2}


def test_shared_bn_module_under_two_names():
    bn = nn.BatchNorm2d(8)
    model = Tiny(bn)
    model.alias = bn
    model = _check_all_branched(model, [32, 16])
    assert model.alias is model.bn


@timm.layers.register_notrace_module
class OpaqueBlock(nn.Module):
    """A leaf for the tracer (data-dependent control flow) holding its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:
            return self.norm(self.conv(x))
        return self.norm(self.conv(-x))


def test_bn_inside_leaf_module():
    model = Tiny(nn.Sequential(nn.BatchNorm2d(8), OpaqueBlock()))
    model = _check_all_branched(model, [32, 16])
    report = model._sct_context.report
    assert report.traced and "bn.1.norm" in report.inside_leaf_modules


class FunctionalNorm(nn.Module):
    """Holds only batch-norm state and applies it with F.batch_norm."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, 0.1, 1e-5)


def test_functional_batch_norm_owner_is_branched():
    model = Tiny(FunctionalNorm(8))
    original = copy.deepcopy(model).eval()
    sct.convert(model, [32, 16]).eval()
    assert isinstance(model.bn, sct.ScaleSpecificBatchNorm)
    assert model._sct_context.report.functional_owners == ["bn"]
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        assert_equivalent(model(x), original(x))


def test_functional_batch_norm_on_mixed_module_is_refused_by_name():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gamma = nn.Parameter(torch.ones(8))
            self.register_buffer("mu", torch.zeros(8))
            self.register_buffer("var", torch.ones(8))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mu, self.var, self.gamma, None, self.training).mean((2, 3))

    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sct.ConversionError, match=r"Mixed.*conv"):
        sct.convert(model, [32, 16])
    assert not hasattr(model, "_sct_context")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_untraceable_model_converts_by_module_tree():
    class Dynamic(Tiny):
        def forward(self, x):
            for _ in range(int(x.shape[-1]) // 16):  # python loop on a shape: not traceable
                x = x
            return super().forward(x) if x.sum() > -1e9 else None

    model = _check_all_branched(Dynamic(), [32, 16])
    assert model._sct_context.report.traced is False


def test_untraceable_model_with_functional_bn_is_refused():
    class Dynamic(Tiny):
        def forward(self, x):
            return super().forward(x) if x.sum() > -1e9 else None

    with pytest.raises(sct.ConversionError, match="'bn'.*functionally"):
        sct.convert(Dynamic(FunctionalNorm(8)), [32, 16])


def test_sync_batchnorm_conversion_reaches_every_branch():
    model = sct.convert(Tiny(), [32, 16])
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for layer in (model.bn, model.head_norm):
        assert all(isinstance(b, nn.SyncBatchNorm) for b in layer.branches.values())
    model = sct.convert(Tiny(BatchNormAct2d(8)), [32, 16])
    timm.layers.convert_sync_batchnorm(model)
    assert all(isinstance(b, SyncBatchNormAct) for b in model.bn.branches.values())
    model.eval()
    perturb_branches(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():  # still routes after the swap
        assert torch.equal(model(x), sct.extract(model, 16).eval()(x))


def test_no_batch_norm_is_an_error():
    with pytest.raises(sct.ConversionError, match="no batch-norm layer"):
        sct.convert(timm.create_model("test_vit"), [160, 128])


def test_lazy_uninitialized_batch_norm_is_an_error():
    model = Tiny(nn.LazyBatchNorm2d())
    with pytest.raises(sct.ConversionError, match="lazy"):
        sct.convert(model, [32, 16])


def test_already_converted_and_bare_bn_are_errors():
    model = sct.convert(Tiny(), [32, 16])
    with pytest.raises(ValueError, match="already converted"):
        sct.convert(model, [32, 16])
    with pytest.raises(ValueError, match="itself is a batch-norm"):
        sct.convert(nn.BatchNorm2d(3), [32, 16])


def test_model_that_cannot_run_at_a_scale_names_it_and_is_untouched():
    class FixedSize(Tiny):
        def forward(self, x):
            assert x.shape[-1] == 32, "this model only runs at 32x32"
            return super().forward(x)

    model = FixedSize()
    with pytest.raises(sct.ConversionError, match=r"scale 24 .*only runs at 32x32"):
        sct.convert(model, [32, 24])
    assert isinstance(model.bn, nn.BatchNorm2d) and not hasattr(model, "_sct_context")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 19200000 bytes"),
], ids=["cuda", "cpu"])
def test_out_of_memory_while_probing_is_not_blamed_on_the_scale(error):
    class Hungry(Tiny):
        def forward(self, x):
            if x.shape[-1] == 64:
                raise error
            return super().forward(x)

    model = Hungry()
    with pytest.raises(type(error), match="allocate") as raised:
        sct.convert(model, [64, 32])
    assert not isinstance(raised.value, sct.ConversionError)
    assert isinstance(model.bn, nn.BatchNorm2d) and not hasattr(model, "_sct_context")


def test_branch_independence_in_training():
    model = sct.convert(Tiny(), [32, 16])
    perturb_branches(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with sct.scale(model, 16):
        model(torch.randn(4, 3, 16, 16)).sum().backward()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if ".branches.32." in k:
            assert not changed, k
        if ".branches.16." in k and ("running" in k or "num_batches" in k):
            assert changed, k
    for name, p in model.named_parameters():
        if ".branches.32." in name:
            assert p.grad is None
        if ".branches.16." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
