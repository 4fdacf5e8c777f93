"""One routing rule: every backend (eager, FX, torch.compile, torch.export, TorchScript, ONNX)
picks the same branch on one grid of sizes; unknown_scale="interpolate" blends the two
bracketing branches in eager, compile and export; every input the model takes is routed."""
import copy
import functools
import os
import warnings

import numpy as np
import pytest
import torch
from _util import Clip, ConvBN, perturb_branches
from torch import nn

import sct_convert as sct
from sct_convert.core.scales import normalize_scale
from sct_convert.deploy.api import export_program_object, read_deploy_metadata
from sct_convert.core.rule import Blend, ScaleBlend, bracket, choose

# 1024, 384, 384 (two shapes, same pixel count), 256 pixels
SCALES = [32, (24, 16), (16, 24), 16]
GRID = [
    (32, 32), (24, 16), (16, 24), (16, 16),  # trained, including non-square
    (28, 28), (20, 20), (18, 18),            # in between
    (22, 32), (16, 20),                      # 704 px: tie of 1024 and 384; 320 px: of 384 and 256
    (19, 20), (20, 19),                      # 380 px: tie of (24, 16) and (16, 24) -> listed first
    (8, 8), (40, 40), (12, 64),              # outside the trained range
]


Net = functools.partial(ConvBN, depth=2, classes=3)


def converted(policy="nearest", video=False):
    net = Net(conv=nn.Conv3d, norm=nn.BatchNorm3d) if video else Net()
    model = sct.convert(net, SCALES, unknown_scale=policy).eval()
    perturb_branches(model)
    return model


def inputs(hw, video=False):
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    return torch.randn(2, 3, *((3,) if video else ()), *hw, generator=g)


def served_by(model, x, out):
    """The scales whose branch, pinned, gives ``out`` for ``x`` (exactly one when routing picks one)."""
    found = []
    with torch.no_grad():
        for s in SCALES:
            with sct.scale(model, s):
                if torch.allclose(model(x), out, atol=1e-5):
                    found.append(s)
    return found


def expected_scale(hw):
    """Written from DESIGN.md's rule, not the library's: exact (h, w) first, else the scale fewest
    pixels away, ties to the one listed first."""
    sizes = [normalize_scale(s) for s in SCALES]
    if tuple(hw) in sizes:
        return SCALES[sizes.index(tuple(hw))]
    gaps = [abs(hw[0] * hw[1] - h * w) for h, w in sizes]
    return SCALES[gaps.index(min(gaps))]


def test_rule_ties_and_brackets():
    sizes = [(32, 32), (24, 16), (16, 24), (16, 16)]
    assert choose((22, 32), sizes, "nearest") == 0        # tie 1024 / 384: the scale listed first
    assert choose((16, 20), sizes, "nearest") == 1        # tie 384 / 256: the scale listed first
    assert choose((19, 20), sizes, "nearest") == 1        # tie of the two 384 px shapes: listed first
    assert choose((16, 24), sizes, "interpolate") == 2    # exact size first, under every policy
    assert choose((20, 20), sizes, "error") is None
    assert bracket((20, 20), sizes) == Blend(1, 0, (400 - 384) / (1024 - 384))
    assert bracket((8, 8), sizes) is None and bracket((40, 40), sizes) is None
    assert choose((40, 40), sizes, "interpolate") == 0    # outside the range: nearest


@pytest.mark.parametrize("video", [False, True], ids=["images", "clips"])
@pytest.mark.slow
def test_every_backend_makes_the_same_choice_on_one_grid(video, tmp_path):
    model = converted(video=video)
    grid = GRID if not video else [(32, 32), (24, 16), (20, 20), (22, 32), (19, 20), (8, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fx = torch.fx.symbolic_trace(model)
        compiled = torch.compile(model, backend="eager", dynamic=True)
        program = export_program_object(model, None, inputs((32, 32), video)).module()
        scripted = torch.jit.script(model)
    backends = {"eager": model, "fx": fx, "compile": compiled, "export": program, "torchscript": scripted}
    session = None
    try:
        import onnxruntime as ort

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = sct.export_onnx(model, tmp_path / "m.onnx", example_input=inputs((32, 32), video))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except ImportError:  # the [onnx] extra is in dev: CI has it
        pytest.fail("onnxruntime is part of the dev extra; install it: pip install -e '.[dev]'")
    for hw in grid:
        x = inputs(hw, video)
        want = expected_scale(hw)
        for name, backend in backends.items():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = backend(x)
            assert served_by(model, x, out) == [want], (name, hw)
        out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert served_by(model, x, out) == [want], ("onnx", hw)


def manual_blend(model, x, blend):
    """The model with every S-BN's branch tensors blended by hand (the definition)."""
    ctx = sct.context_of(model)
    low, high = ctx.scales[blend.low], ctx.scales[blend.high]
    plain = sct.extract(model, low)
    other = dict(sct.extract(model, high).state_dict())
    with torch.no_grad():
        for name, t in plain.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.lerp(t, other[name], blend.t))
        return plain.eval()(x)


def test_interpolate_blends_in_between_sizes_and_keeps_trained_and_outside_sizes():
    model = converted("interpolate")
    nearest = copy.deepcopy(model)
    sct.context_of(nearest).unknown_scale = "nearest"
    sizes = sct.context_of(model).sizes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for hw in GRID:
            x = inputs(hw)
            blend = bracket(hw, sizes)
            if blend is None or hw in sizes:
                assert torch.equal(model(x), nearest(x)), hw
            else:
                assert torch.allclose(model(x), manual_blend(model, x, blend), atol=1e-5), hw
                assert not torch.allclose(model(x), nearest(x), atol=1e-4), hw
    assert sct.route(model, (20, 20)) == ScaleBlend((24, 16), 32, (400 - 384) / 640)


def test_interpolate_is_the_same_blend_compiled_exported_and_fx_traced(tmp_path):
    model = converted("interpolate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, backend="eager", dynamic=True)
        fx = torch.fx.symbolic_trace(model)
        path = sct.export_program(model, tmp_path / "m.pt2")
        program = torch.export.load(str(path)).module()
    assert read_deploy_metadata(path)["routing"] == "interpolate"
    with torch.no_grad():
        for hw in GRID:
            x = inputs(hw)
            want = model(x)
            for name, backend in (("compile", compiled), ("fx", fx), ("export", program)):
                assert torch.allclose(backend(x), want, atol=1e-5), (name, hw)


def test_interpolate_model_exports_onnx_as_nearest_and_says_so(tmp_path):
    pytest.importorskip("onnxruntime")
    model = converted("interpolate")
    with pytest.warns(UserWarning, match="nearest branch.*add_scale"):
        path = sct.export_onnx(model, tmp_path / "m.onnx")
    meta = read_deploy_metadata(path)
    assert meta["routing"] == "nearest" and "interpolate" in meta["routing_note"]
    with pytest.raises(sct.ConversionError, match="interpolate.*export_program"):
        torch.jit.script(model)


def test_interpolated_training_reaches_both_branches_and_changes_no_statistics():
    model = converted("interpolate").train()
    sct.set_sampling(model, scales=[32], between=True)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    torch.manual_seed(0)
    out = model(torch.randn(4, 3, 32, 32))
    assert len(out) == 2 and out.scales[0] == 32 and out.scales[1] not in SCALES
    between = out.scales[1]
    blend = bracket(normalize_scale(between), sct.context_of(model).sizes)
    assert blend is not None
    out[1].sum().backward()
    keys = sct.context_of(model).keys
    grads = {k: model.bn.branches[k].weight.grad for k in keys}
    touched = {keys[blend.low], keys[blend.high]}
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in touched)
    assert all(grads[k] is None for k in set(keys) - touched - {"32"})
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    changed = {k.split(".")[2] for k in stats if not torch.equal(stats[k], after[k])}
    assert changed == {"32"}  # only the trained scale's own forward updated statistics
    loss = sct.SCTLoss(nn.CrossEntropyLoss())(out, torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["tensor", "clip", "list", "dict", "keyword"])
def test_every_input_the_model_takes_is_routed(kind):
    class Wrapped(nn.Module):  # inputs the way detection / multi-input models take them
        def __init__(self, video):
            super().__init__()
            self.net = Net(conv=nn.Conv3d, norm=nn.BatchNorm3d) if video else Net()

        def forward(self, images):
            if isinstance(images, dict):
                images = images["image"]
            if isinstance(images, list):
                images = torch.stack(images)
            return self.net(images)

    video = kind == "clip"
    model = sct.convert(Wrapped(video), [32, 16]).eval()
    perturb_branches(model)
    for side in (32, 16):
        x = inputs((side, side), video)
        with sct.scale(model, side), torch.no_grad():
            want = model(x)
        args, kwargs = {"tensor": ((x,), {}), "clip": ((x,), {}), "list": ((list(x),), {}),
                        "dict": (({"image": x},), {}), "keyword": ((), {"images": x})}[kind]
        with torch.no_grad():
            assert torch.allclose(model(*args, **kwargs), want), (kind, side)
    # sampling resizes whatever holds the image, frames of a clip included
    model.train()
    big = inputs((32, 32), video)
    arg = {"tensor": big, "clip": big, "list": list(big), "dict": {"image": big}, "keyword": big}[kind]
    out = model(images=arg) if kind == "keyword" else model(arg)
    assert out.scales == (32, 16)


def test_an_onnx_file_that_fails_in_onnxruntime_is_never_written(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import sct_convert.deploy.onnx_graph as onnx_graph

    model = sct.convert(Net(), [32, 16]).eval()
    real = onnx_graph.switchable_model

    def broken(*args, **kwargs):  # a graph whose routing reads an axis the input lacks
        graph = real(*args, **kwargs)
        for tensor in graph.graph.initializer:
            if tensor.name.endswith("h_axis"):
                tensor.CopyFrom(onnx_graph.numpy_helper.from_array(np.asarray([7], np.int64), tensor.name))
        return graph

    monkeypatch.setattr(onnx_graph, "switchable_model", broken)
    with pytest.raises(ValueError, match=r"fails in onnxruntime at scale 32: .*nothing was written"):
        sct.export_onnx(model, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_a_clip_model_exports_onnx_files_with_dynamic_batch_frames_and_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    # a bias-free Conv3d: torch.onnx's unoptimised graph gives it a zero bias of the wrong shape
    clip = sct.convert(Clip(), [16, 12], example_input=torch.randn(1, 3, 4, 16, 16)).eval()
    perturb_branches(clip)
    switchable = sct.export_onnx(clip, tmp_path / "clip.onnx", example_input=torch.randn(2, 3, 4, 16, 16))
    per_scale = sct.export_onnx(clip, tmp_path / "clip_12.onnx", 12, example_input=torch.randn(2, 3, 4, 12, 12))
    for path, sides in ((switchable, (16, 12, 14)), (per_scale, (12,))):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for side in sides:
            for batch, frames in ((2, 4), (1, 7)):  # traced with 4 frames: the clip length is free
                x = torch.randn(batch, 3, frames, side, side)
                with torch.no_grad():
                    want = clip(x).numpy()
                assert np.allclose(session.run(None, {"images": x.numpy()})[0], want, atol=1e-5), (path.name, side)


def test_route_answers_without_warning_and_a_forward_still_warns_once():
    model = sct.convert(Net(), [32, 16]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sct.route(model, (20, 20)) == 16
    with pytest.warns(UserWarning, match=r"input size \(20, 20\) is not a trained scale"):
        model(torch.randn(1, 3, 20, 20))


class SizeBranch(nn.Module):  # Python control flow on the size: torch.export keeps it as a guard
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.shape[-1] > 40:
            x = torch.nn.functional.avg_pool2d(x, 2)
        return x.mean((2, 3))


def test_a_torch_export_program_that_fails_at_a_scale_is_never_written(tmp_path):
    model = sct.convert(SizeBranch(), [64, 32]).eval()
    with pytest.raises(ValueError, match=r"fails at scale 32 \((AssertionError|RuntimeError): .*nothing was written"):
        sct.export_program(model, tmp_path / "m.pt2")  # traced at 64, then at 32: each guards the other out
    assert os.listdir(tmp_path) == []
    program = torch.export.load(sct.export_program(model, tmp_path / "m32.pt2", 32)).module()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(program(x), model(x))  # one scale on its own works
