"""A converted model is an ordinary nn.Module to serve: threads, pickling, replicas, compile.

Routing is per call (nothing is written to the model during forward), so concurrent calls at
different sizes each get their own branch, bit for bit.
"""
import copy
import inspect
import io
import pickle
import threading
import warnings

import pytest
import timm
import torch
from _util import HeadOnlyBN, converted_test_resnet
from torch import nn

import sct_convert as sct

SCALES = [48, 32, 16]


@pytest.fixture(scope="module")
def served():
    original, model = converted_test_resnet(SCALES)  # branches differ: a wrong branch changes the output
    inputs = {s: torch.randn(2, 3, s, s) for s in SCALES}
    with torch.no_grad():
        expected = {s: model(x) for s, x in inputs.items()}
    return original, model, inputs, expected


def _hammer(model, inputs, expected, mode, threads=4, calls=200):
    """``threads`` threads, each cycling through every size ``calls`` times; returns wrong outputs."""
    wrong, errors = [], []
    start = threading.Barrier(threads)

    def work(offset):
        try:
            start.wait()
            with mode():
                for i in range(calls):
                    for j in range(len(SCALES)):
                        s = SCALES[(offset + i + j) % len(SCALES)]
                        if not torch.equal(model(inputs[s]), expected[s]):
                            wrong.append(s)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]
    return wrong


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_threads_at_different_sizes_each_get_their_own_branch(served, mode):
    _, model, inputs, expected = served
    assert _hammer(model, inputs, expected, mode) == []


def test_scripted_model_is_thread_safe_too(served):
    _, model, inputs, expected = served
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    with torch.no_grad():
        for s, x in inputs.items():
            assert torch.equal(scripted(x), expected[s])
    assert _hammer(scripted, inputs, expected, torch.no_grad) == []


def test_scale_pin_holds_for_its_own_thread_only(served):
    _, model, inputs, expected = served
    pinned_ok = threading.Event()
    other = []

    def serve_other_sizes():
        pinned_ok.wait()
        with torch.no_grad():
            other.extend(torch.equal(model(inputs[48]), expected[48]) for _ in range(20))

    with torch.no_grad():
        branch16_at_48 = sct.extract(model, 16).eval()(inputs[48])
    t = threading.Thread(target=serve_other_sizes)
    t.start()
    with torch.no_grad(), sct.scale(model, 16):
        pinned_ok.set()
        for _ in range(20):
            assert torch.equal(model(inputs[48]), branch16_at_48)
    t.join()
    assert other and all(other)
    with torch.no_grad():  # the pin ends with the block, and leaves nothing behind
        assert torch.equal(model(inputs[48]), expected[48])
        feats = model.forward_features(inputs[48])
        assert torch.equal(feats, sct.extract(model, 48).eval().forward_features(inputs[48]))


def _round_trips(model):
    yield "pickle", pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    yield "torch.save", torch.load(buf, weights_only=False)
    yield "deepcopy", copy.deepcopy(model)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_pickle_torch_save_and_deepcopy_keep_routing_and_sampling(served, training):
    original, model, inputs, expected = served
    model = copy.deepcopy(model).train(training)
    for how, copied in _round_trips(model):
        assert type(copied) is type(model), how
        assert copied.training == training
        assert inspect.signature(copied.forward) == inspect.signature(original.forward), how
        assert sct.scales_of(copied) == tuple(SCALES)
        copied.eval()
        with torch.no_grad():
            for s, x in inputs.items():
                assert torch.equal(copied(x), expected[s]), (how, s)
            with pytest.warns(UserWarning, match=r"input size \(40, 40\)"):
                copied(torch.randn(1, 3, 40, 40))  # still routes an untrained size to the nearest
        copied.train()
        out = copied(inputs[48])
        assert isinstance(out, sct.ScaleOutputs) and out.scales == tuple(SCALES), how


def test_the_converted_forward_keeps_the_original_signature(served):
    original, model, _, _ = served
    assert inspect.signature(model.forward) == inspect.signature(original.forward)
    assert type(model).__name__ == type(original).__name__
    assert isinstance(model, type(original))


def _replicate_like_data_parallel(network, copies, monkeypatch):
    """torch.nn.parallel.replicate itself, on CPU: only its device transport (which needs CUDA)
    is swapped for one that hands every replica the same tensors, as one device would hold them;
    the module replication is torch's own code."""
    import importlib

    replicate = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate, "_get_device_index", lambda device, optional=False: 0)
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [list(tensors) for _ in devices])
    return replicate.replicate(network, ["cpu"] * copies, detach=True)


def test_data_parallel_replicas_route_independently_from_threads(served, monkeypatch):
    _, model, inputs, expected = served
    replicas = _replicate_like_data_parallel(model, 3, monkeypatch)
    assert all(r._sct_context is model._sct_context for r in replicas)  # shared, as in DataParallel
    wrong, errors = [], []

    def work(replica, s):
        try:
            with torch.no_grad():
                for _ in range(100):
                    if not torch.equal(replica(inputs[s]), expected[s]):
                        wrong.append(s)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    workers = [threading.Thread(target=work, args=(r, s)) for r, s in zip(replicas, SCALES)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and not wrong


@pytest.mark.slow
def test_compile_with_dynamic_shapes_serves_five_scales_with_at_most_two_graphs():
    import torch._dynamo
    from torch._dynamo.utils import counters

    scales = [96, 80, 64, 48, 32]
    _, model = converted_test_resnet(scales, num_classes=5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", dynamic=True)
    with torch.no_grad():
        for s in scales:
            x = torch.randn(2, 3, s, s)
            assert torch.equal(compiled(x), model(x)), s
    assert counters["stats"]["unique_graphs"] <= 2
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the train-mode forward (sampling every scale) compiles whole too
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(model.train(), backend="eager")(torch.randn(2, 3, 96, 96))
    assert isinstance(out, sct.ScaleOutputs) and len(out) == len(scales)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_routing_messages_name_the_image_size_not_the_entry_layers():
    model = sct.convert(timm.create_model("test_resnet"), [96, 64]).eval()
    with pytest.warns(UserWarning, match=r"input size \(80, 80\) is not a trained scale"):
        with torch.no_grad():
            model(torch.randn(1, 3, 80, 80))
    strict = sct.convert(timm.create_model("test_resnet"), [96, 64], unknown_scale="error").eval()
    with pytest.raises(ValueError, match=r"input size \(80, 80\) matches none"):
        with torch.no_grad():
            strict(torch.randn(1, 3, 80, 80))
    assert sct.route(model, torch.randn(1, 3, 70, 70)) == 64


def test_a_batch_norm_run_outside_any_call_is_a_clear_error(served):
    _, model, _, _ = served
    feats = torch.randn(1, model.layer1[0].conv1.in_channels, 8, 8)
    raised = []

    def fresh_thread():  # no call of the model has run here, so no branch was chosen
        try:
            model.layer1(feats)
        except RuntimeError as e:
            raised.append(str(e))

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert raised and "ran without a route" in raised[0] and "sct.scale(model, s)" in raised[0]

    def pinned_thread():  # a pin says which branch, in a thread where the model never ran
        with sct.scale(model, 32), torch.no_grad():
            raised.append(model.layer1(feats))

    t = threading.Thread(target=pinned_thread)
    t.start()
    t.join()
    with torch.no_grad():
        want = sct.extract(model, 32).eval().layer1(feats)
    assert torch.equal(raised[1], want)  # branch 32, not whatever ran last in another thread


def test_keyword_input_samples_like_a_positional_one(served):
    _, model, inputs, _ = served
    model = copy.deepcopy(model).train()
    out = model(x=inputs[48])
    assert isinstance(out, sct.ScaleOutputs) and out.scales == tuple(SCALES)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x=inputs[32]), model(inputs[32]))


def test_extract_leaves_the_users_forward_pre_hooks_in_order():
    model = sct.convert(HeadOnlyBN(), [32, 16])  # the entry is a hook on conv
    model.conv.register_forward_pre_hook(lambda m, a: None)
    before = list(model.conv._forward_pre_hooks.items())
    plain = sct.extract(model, 16)
    assert list(model.conv._forward_pre_hooks.items()) == before
    assert len(plain.conv._forward_pre_hooks) == 1  # the user's hook, not the router


def test_calibrate_skips_batch_norms_without_running_statistics():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.free = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            return self.free(self.bn(self.conv(x))).mean((2, 3))

    model = sct.convert(Mixed(), [32, 16])
    data = [torch.randn(4, 3, 32, 32) + 3 for _ in range(2)]
    sct.calibrate(model, data, num_batches=2, progress=False)
    assert float(model.bn.branches["16"].running_mean.abs().mean()) > 0.1  # re-estimated
    assert model.free.branches["16"].running_mean is None


@pytest.mark.parametrize("wrapper", ["DataParallel", "DDP"])
def test_save_of_a_wrapped_model_loads(tmp_path, wrapper):
    import torch.distributed as dist

    _, model = converted_test_resnet([64, 32], num_classes=3)
    if wrapper == "DDP":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped = nn.DataParallel(model) if wrapper == "DataParallel" else nn.parallel.DistributedDataParallel(model)
        path = sct.save(wrapped, tmp_path / "m.safetensors")
        sct.export(wrapped, 32, tmp_path / "m32.safetensors")
    finally:
        if wrapper == "DDP":
            dist.destroy_process_group()
    loaded = sct.load(path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    plain = sct.load_plain(timm.create_model("test_resnet", num_classes=3), tmp_path / "m32.safetensors")
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model(x))


def test_grayscale_model_converts_and_reloads_with_its_own_channels(tmp_path):
    model = timm.create_model("resnet10t", in_chans=1, num_classes=2)
    model = sct.convert(model, [64, 32]).eval()
    x = torch.randn(1, 1, 32, 32)
    loaded = sct.load(sct.save(model, tmp_path / "gray.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_scripted_model_keeps_the_originals_output_type():
    import torchvision

    model = sct.convert(torchvision.models.googlenet(init_weights=False, num_classes=5).eval(), [96, 64]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original_scripted = torch.jit.script(sct.extract(model, 64).eval())
        scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = scripted(x), original_scripted(x)
    assert type(got).__name__ == type(want).__name__ == "GoogLeNetOutputs"
    assert torch.equal(got.logits, want.logits)
