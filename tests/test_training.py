"""SCT training: scale sampling, Eq. 1, train_step gradients, independence, AMP, compile."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from _util import TrainOnlyHead, perturb_branches
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import sct_convert as sct

SCALES = [64, 48, 32]


def make(num_classes=4, **kw):
    torch.manual_seed(0)
    return sct.convert(timm.create_model("test_resnet", num_classes=num_classes), SCALES, **kw)


def batch(n=4, size=64, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_train_forward_samples_every_scale_in_order():
    model = make().train()
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x, _ = batch(size=64)
    out = model(x)
    assert isinstance(out, sct.ScaleOutputs) and out.scales == tuple(SCALES) and len(out) == 3
    assert seen[0] is x  # a batch already at a scale passes through untouched
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(seen[2], expected)
    assert out.by_scale()[48].shape == (4, 4)
    assert out.primary.argmax(-1).shape == (4,)  # logging code: one scale, said explicitly


def test_eval_and_sampling_off_return_the_models_own_output():
    model = make().eval()
    x, _ = batch()
    assert isinstance(model(x), torch.Tensor)
    sct.set_sampling(model, False)
    model.train()
    assert isinstance(model(x), torch.Tensor)
    assert isinstance(make(sampling=False).train()(x), torch.Tensor)
    model = make().train()
    with sct.scale(model, 48):
        assert isinstance(model(x), torch.Tensor)


def test_subset_of_scales_and_rank_consistent_draw():
    model = make().train()
    x, _ = batch()
    with sct.sampling_scales(model, [32, 64]):
        out = model(x)
    assert out.scales == (64, 32)  # model order, not the order asked
    assert model(x).scales == tuple(SCALES)
    assert sct.random_scale_subset(model, 2, step=7) == sct.random_scale_subset(model, 2, step=7)


def test_random_scale_subset_draws_k_scales_per_step_alike_on_every_rank():
    model, rank1 = make(), make()  # two ranks' models, built apart
    draws = [sct.random_scale_subset(model, 2, step) for step in range(60)]
    assert all(len(d) == 2 and len(set(d)) == 2 and set(d) <= set(SCALES) for d in draws)
    assert all(d == sorted(d, key=SCALES.index) for d in draws)  # in the model's order
    assert draws == [sct.random_scale_subset(rank1, 2, step) for step in range(60)]  # every rank the same
    assert {tuple(d) for d in draws} == {(64, 48), (64, 32), (48, 32)}  # every subset comes up
    assert draws != [sct.random_scale_subset(model, 2, step, seed=1) for step in range(60)]  # the seed matters
    assert sct.random_scale_subset(model, 3, 5) == list(SCALES)
    with pytest.raises(ValueError):
        sct.random_scale_subset(model, 4, 0)
    with pytest.raises(ValueError, match="not one of"):
        sct.set_sampling(model, True, [100])


def test_sampling_forward_updates_only_sampled_branches():
    model = make().train()
    perturb_branches(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch()
    with sct.sampling_scales(model, [48]):
        out = model(x)
    sct.SCTLoss(torch.nn.CrossEntropyLoss())(out, y).backward()
    after = model.state_dict()
    for k in before:
        if ".branches." in k and "running_mean" in k:
            assert torch.equal(before[k], after[k]) != (".branches.48." in k), k
    for name, p in model.named_parameters():
        if ".branches." in name:
            assert (p.grad is not None) == (".branches.48." in name), name


def test_sct_loss_is_eq1():
    model = make().train()
    x, y = batch()
    out = model(x)
    ce = torch.nn.CrossEntropyLoss()
    per = [ce(o, y) for o in out]
    loss = sct.SCTLoss(ce)(out, y)
    assert torch.allclose(loss, sum(per) / 3)
    crit = sct.SCTLoss(ce, weights=[0.5, 0.3, 0.2])
    assert torch.allclose(crit(out, y), 0.5 * per[0] + 0.3 * per[1] + 0.2 * per[2])
    assert set(crit.last_losses) == set(SCALES)
    assert torch.allclose(sct.SCTLoss(ce, weights={64: 1.0, 48: 0.0, 32: 2.0})(out, y), per[0] + 2 * per[2])
    with pytest.raises(ValueError, match="3 output scales"):
        sct.SCTLoss(ce, weights=[1.0, 1.0])(out, y)
    with pytest.raises(ValueError, match="no weight for scales"):
        sct.SCTLoss(ce, weights={64: 1.0})(out, y)
    logits = out[0]
    assert torch.equal(sct.SCTLoss(ce)(logits, y), ce(logits, y))  # plain tensors pass through


def test_sct_loss_soft_targets_from_mixup():
    model = make(num_classes=4).train()
    x, y = batch()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=4)
    xm, ym = mixup(x, y)
    out = model(xm)
    loss = sct.SCTLoss(SoftTargetCrossEntropy())(out, ym)
    expected = sum(SoftTargetCrossEntropy()(o, ym) for o in out) / 3
    assert ym.shape == (4, 4) and torch.allclose(loss, expected)
    loss.backward()


def test_sct_loss_aux_logits_like_torchvision():
    model = sct.convert(torchvision.models.googlenet(aux_logits=True, init_weights=False, num_classes=3), [96, 64])
    model.train()
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([0, 2])
    out = model(x)
    ce = torch.nn.CrossEntropyLoss()
    expected = sum(ce(o.logits, y) + 0.3 * ce(o.aux_logits1, y) + 0.3 * ce(o.aux_logits2, y) for o in out) / 2
    assert torch.allclose(sct.SCTLoss(ce)(out, y), expected)


def test_distillation_terms():
    model = make().train()
    x, y = batch()
    out = model(x)
    ce = torch.nn.CrossEntropyLoss()
    plain = sct.SCTLoss(ce)(out, y)
    teacher = out[0].detach()

    def kd(s, t):
        return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")

    inplace = sct.SCTLoss(ce, distill="inplace", distill_weight=0.5)(out, y)
    assert torch.allclose(inplace, plain + 0.5 * (kd(out[1], teacher) + kd(out[2], teacher)) / 3)
    ens_teacher = sum(o.detach() for o in out) / 3
    ensemble = sct.SCTLoss(ce, distill="ensemble")(out, y)
    assert torch.allclose(ensemble, plain + sum(kd(o, ens_teacher) for o in out) / 3)
    with pytest.raises(ValueError, match="distill"):
        sct.SCTLoss(ce, distill="teacher")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("distill", [None, "inplace"])
def test_train_step_gradients_equal_the_drop_in_loop(distill):
    a = make()
    b = copy.deepcopy(a)
    x, y = batch(size=64)
    crit = sct.SCTLoss(torch.nn.CrossEntropyLoss(), distill=distill)
    a.train()
    crit(a(x), y).backward()
    opt = torch.optim.SGD(b.parameters(), lr=0.0)
    result = sct.train_step(b.train(), x, y, crit, opt)
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)
    assert set(result.per_scale) == set(SCALES) and torch.allclose(result.loss, sum(result.per_scale.values()))


def test_train_step_clip_scaler_amp_and_subset():
    model = make()
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu")
    res = sct.train_step(model.train(), x, y, torch.nn.CrossEntropyLoss(), opt, scaler,
                         amp_dtype=torch.bfloat16, clip_grad_norm=1.0, scales=[64, 32])
    assert set(res.per_scale) == {64, 32}
    after = model.state_dict()
    assert torch.equal(before["bn1.branches.48.running_mean"], after["bn1.branches.48.running_mean"])
    assert not torch.equal(before["conv1.0.weight"], after["conv1.0.weight"])
    with pytest.raises(ValueError, match="ensemble"):
        sct.train_step(model, x, y, sct.SCTLoss(torch.nn.CrossEntropyLoss(), distill="ensemble"), opt)


def test_autocast_bf16_train_and_eval_and_channels_last():
    model = make()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x)
        loss = sct.SCTLoss(torch.nn.CrossEntropyLoss())(out, y)
    assert out[0].dtype == torch.bfloat16
    loss.backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    model = model.to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(model(xc), model(x), atol=1e-5)
    model.train()
    out = model(xc)
    assert all(o.shape == (4, 4) for o in out)


@pytest.mark.slow  # 21 s on 2 CPU cores: inductor compiles every scale
def test_torch_compile_eval_per_scale_and_train_step_match_eager():
    torch._dynamo.reset()
    model = make().eval()
    perturb_branches(model)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for s in SCALES:
            x, _ = batch(size=s)
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
    # the compiled train-mode forward is the sampling forward: same loss and grads as eager
    eager = make().train()
    comp_model = copy.deepcopy(eager)
    compiled = torch.compile(comp_model, backend="aot_eager")
    x, y = batch()
    crit = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    le, lc = crit(eager(x), y), crit(compiled(x), y)
    le.backward()
    lc.backward()
    assert torch.allclose(le, lc, atol=1e-5)
    ge, gc = _grads(eager), _grads(comp_model)
    assert all(torch.allclose(ge[n], gc[n], atol=1e-4) for n in ge)


def test_shared_bn_switch_samples_without_branches():
    import torch.nn as nn

    base = timm.create_model("test_resnet", num_classes=4)
    model = sct.convert(copy.deepcopy(base), SCALES, scale_specific_bn=False).train()
    assert not list(sct.scale_specific_layers(model))
    assert set(model.state_dict()) == set(base.state_dict())
    x, y = batch()
    out = model(x)
    assert out.scales == tuple(SCALES)
    sct.SCTLoss(torch.nn.CrossEntropyLoss())(out, y).backward()
    with pytest.raises(ValueError, match="shared"):
        sct.calibrate(model, [x], progress=False)
    # a GroupNorm model (no BN at all) trains with SCT sampling too
    gn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.AdaptiveAvgPool2d(1),
                       nn.Flatten(), nn.Linear(8, 4))
    sct.convert(gn, [32, 16], scale_specific_bn=False).train()
    assert len(gn(torch.randn(2, 3, 32, 32))) == 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_drop_in_and_train_step_with_grad_scaler(dtype):
    model = make().cuda().train()
    x, y = (t.cuda() for t in batch())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
        loss = crit(out, y)
    assert all(o.dtype == dtype for o in out)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    res = sct.train_step(model, x, y, crit, opt, scaler, amp_dtype=dtype, clip_grad_norm=1.0)
    assert torch.isfinite(res.loss) and set(res.per_scale) == set(SCALES)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        for s in SCALES:
            assert model(batch(size=s)[0].cuda()).dtype == dtype


@needs_cuda
def test_cuda_inductor_compile_eval_per_scale_matches_eager():
    torch._dynamo.reset()
    model = make().cuda().eval()
    perturb_branches(model)
    compiled = torch.compile(model)
    with torch.no_grad():
        for s in SCALES:
            x = batch(size=s)[0].cuda()
            assert torch.allclose(compiled(x), model(x), atol=1e-4)


@pytest.mark.parametrize("scale_specific_bn", [True, False], ids=["s-bn", "shared-bn"])
def test_convert_warns_when_training_fails_at_a_scale_that_evaluates(scale_specific_bn):
    model = TrainOnlyHead()
    model.eval().bn.train()  # mixed flags must come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"scale 8: .*train-mode forward fails \(input 2x3x8x8\)") as caught:
        sct.convert(model, [32, 8], scale_specific_bn=scale_specific_bn)
    assert caught[0].filename == __file__  # points at the caller's convert line
    # The check's train-mode forwards leave no trace: statistics, flags, RNG stream.
    assert torch.equal(torch.rand(1), expected_draw)
    assert [m.training for m in (model, model.conv, model.bn, model.aux)] == [False, False, True, False]
    bn = model.bn.branches["8"] if scale_specific_bn else model.bn
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, key), before[f"bn.{key}"])


def test_add_scale_warns_when_training_fails_at_the_new_scale():
    model = sct.convert(TrainOnlyHead(), [32, 24])
    model.train()
    sampling = sct.context_of(model).sampling
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"scale 8: .*train-mode forward fails \(input 2x3x8x8\)") as caught:
        sct.add_scale(model, 8)
    assert caught[0].filename == __file__
    assert torch.equal(torch.rand(1), expected_draw)
    assert model.training and sct.context_of(model).sampling == sampling
    assert sct.scales_of(model) == (32, 24, 8)
    branch = model.bn.branches["8"]
    assert int(branch.num_batches_tracked) == 0  # the probe's train forward left no statistics
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sct.add_scale(model, 16)  # trains at 16: no warning


@pytest.mark.skipif(not hasattr(Exception, "add_note"), reason="exception notes need Python 3.11")
def test_train_forward_failure_names_the_scale():
    with pytest.warns(UserWarning, match="scale 8"):
        model = sct.convert(TrainOnlyHead(), [32, 8])
    with pytest.raises(RuntimeError) as raised:
        model.train()(torch.randn(2, 3, 32, 32))
    assert any("scale 8 (input 2x3x8x8)" in note for note in raised.value.__notes__)


@pytest.mark.parametrize("model", [
    TrainOnlyHead(needs_targets=True),  # fails in train mode at every size: not about the scale
    timm.create_model("test_resnet.r160_in1k", pretrained=False),
], ids=["train-mode-needs-targets", "test_resnet"])
def test_convert_does_not_warn_when_training_at_every_scale_works_or_fails_alike(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sct.convert(model, [32, 16])


def test_scale_outputs_never_act_silently_on_one_scale():
    model = make().train()
    x, y = batch(size=64)
    out = model(x)
    for use in (lambda o: o.sum(), lambda o: o.mean(), lambda o: o.backward(), lambda o: o.item(),
                lambda o: o.shape):
        with pytest.raises(AttributeError, match="SCTLoss"):
            use(out)
    for use in (lambda o: o == y, lambda o: o * 2, lambda o: 2 * o, lambda o: o + 1):
        with pytest.raises(TypeError, match="per scale"):
            use(out)
    # per-scale tensor methods apply to every scale and keep the set
    moved = out.detach().float().to("cpu")
    assert isinstance(moved, sct.ScaleOutputs) and moved.scales == out.scales
    assert all(not t.requires_grad for t in moved)
    preds = out.argmax(-1)
    assert isinstance(preds, sct.ScaleOutputs) and all(p.shape == (4,) for p in preds)
    # accuracy logging says which scale it reads
    assert (out.primary.argmax(-1) == y).shape == (4,)
    # libraries that rebuild containers with type(obj)(values) keep the scales (Accelerate's honor_type)
    rebuilt = type(out)(t * 1 for t in out)
    assert isinstance(rebuilt, sct.ScaleOutputs) and rebuilt.scales == out.scales
    assert sct.ScaleOutputs(list(out), out.scales).scales == out.scales
    import pickle

    assert pickle.loads(pickle.dumps(moved)).scales == out.scales
    import torch.utils._pytree as pytree

    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == len(SCALES) and pytree.tree_unflatten(leaves, spec).scales == out.scales
