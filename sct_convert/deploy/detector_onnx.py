"""ONNX files of torchvision detectors: one scale's plain detector, through the exporter that can
trace it, checked in onnxruntime against ``sct.extract(model, s)`` before it is written.

A per-scale file is the unmodified torchvision detector of that scale (its branch in place of
every S-BN, its transform resizing to the scale), taking one ``(3, H, W)`` image of any size
and returning torchvision's detections (``boxes``, ``scores``, ``labels``; ``masks``,
``keypoints`` where the model has them) as separate outputs named after them.

Two routes, tried in order (:data:`EXPORTERS`): ``torch.onnx.export(dynamo=True)``, which goes
through ``torch.export``, and, when that cannot trace the model, the TorchScript-based exporter
(``dynamo=False``) that torchvision's own ``test/test_onnx.py`` uses. With torch <= 2.15
``torch.export`` cannot trace torchvision's detectors (data-dependent shapes in the
post-processing: pytorch/vision#9306, #9321; the fix, pytorch/vision PR #9395, is not released),
so the second route runs today; trying the first each time means the deprecated one stops being
used as soon as the installed torch can do without it. The file's metadata records which ran
(``exporter``).
"""
from __future__ import annotations

import functools
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, TypeVar

import numpy as np
import torch
from torch import nn

from ..core.model import context_of, extract, unwrap
from .._utils.files import PathLike, atomic_write
from ..core.scales import HW, Scale, scale_key
from ..runtime import open_session
from ..metadata_fields import EXPORTERS
from .onnx_trace import INPUT_NAME

#: The second input of a switchable detector core: the side its batch was resized to.
SIZE_INPUT = "size"

#: The export routes, in the order they are tried.

#: Detections a check compares, in score order (the rest sit near the score threshold, where a
#: last-bit difference may keep or drop one).
COMPARED = 20

#: Score distance from the cut within which a detection need not be found in the other run.
MARGIN = 1e-3


def check_sizes(hw: HW) -> List[HW]:
    """Two image sizes, neither the scale itself, that a file is run at before it is written:
    both smaller than the scale, so the transform enlarges them, and both exercise the dynamic
    height and width. (Some shrinking resizes come out differently in torchvision's traced
    transform than in its eager one, for the plain detector as for ours: docs/deploy.md.)"""
    h, w = hw
    return [(round(h * 0.75), w), (round(h * 0.8), round(w * 0.6))]


def structured_image(hw: HW, seed: int) -> torch.Tensor:
    """A test image with structure at several sizes (smooth blobs plus fine noise): a flat or
    white-noise image scores many boxes exactly alike, which leaves their order to chance."""
    g = torch.Generator().manual_seed(seed)
    blobs = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=hw, mode="bicubic",
                                            align_corners=False)[0]
    return (0.8 * blobs + 0.2 * torch.rand(3, *hw, generator=g)).clamp(0, 1)


def _export(plain: nn.Module, image: torch.Tensor, names: List[str], path: str, opset: int,
            route: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript tracer's warnings about Python values
        if route == "dynamo":
            torch.onnx.export(plain, ([image],), path, dynamo=True, opset_version=max(opset, 18), verbose=False,
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_shapes=(([{1: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO}],),))
        else:
            torch.onnx.export(plain, ([image],), path, dynamo=False, opset_version=min(opset, 17),
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes={"images": [1, 2], **{n: [0] for n in names}})


def _matched(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], above: float, pool_above: float,
             side: float) -> float:
    """Every detection of ``a`` scoring above ``above`` matched to ``b``'s detection of the same
    label with the nearest box among those scoring above ``pool_above``; the largest difference of
    any output over the matches (boxes and keypoints relative to ``side``). Matching, not order:
    two nearly equal scores may come out in either order."""
    pool = np.nonzero(b["scores"] > pool_above)[0]
    worst = 0.0
    for i in np.nonzero(a["scores"] > above)[0]:
        same = pool[b["labels"][pool] == a["labels"][i]]
        if len(same) == 0:
            return float("inf")
        j = same[np.abs(b["boxes"][same] - a["boxes"][i]).max(axis=1).argmin()]
        for name, va in a.items():
            if name != "labels":
                worst = max(worst, _difference(name, va[i], b[name][j], side))
    return worst


def _difference(name: str, a: np.ndarray, b: np.ndarray, side: float) -> float:
    """How far one detection's output ``name`` is from eager's: boxes in image sides; masks and
    keypoints as the mean over the detection's mask or keypoints (a box a fraction of a pixel off
    moves a mask's edge pixels a lot, and a keypoint is the argmax of a heatmap, which jumps
    between nearly equal peaks), keypoints in image sides; anything else relative to its size
    (at least 1)."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if not diff.size:
        return 0.0
    if name == "boxes":
        return float(diff.max()) / side
    if name == "keypoints":
        return float(diff.mean()) / side
    if name in ("masks", "keypoints_scores"):
        return float(diff.mean()) / (1.0 if name == "masks" else max(1.0, float(np.abs(a).max())))
    return float(diff.max()) / max(1.0, float(np.abs(a).max()))


def _compare(session: Any, plain: nn.Module, names: List[str], hw: HW, seed: int) -> Tuple[float, int]:
    """Run the file and the eager plain detector on one image of size ``hw``: see
    :func:`compare_detections`."""
    image = structured_image(hw, seed)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in plain([image])[0].items()}
    got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: image.numpy()})))
    return compare_detections(want, got, hw)


def compare_detections(want: Dict[str, Any], got: Dict[str, Any], hw: HW) -> Tuple[float, int]:
    """The largest difference between eager's detections (``want``) and a file's (``got``) that
    score above eager's :data:`COMPARED`-th (those near the score threshold may be kept or
    dropped by a last-bit difference), each matched both ways (:func:`_matched`); and how many of
    eager's detections had to be matched. ``ValueError`` when they differ in kind or in whether
    anything was found."""
    want = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in want.items()}
    got = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in got.items()}
    if set(got) != set(want):
        raise ValueError(f"the file's outputs {sorted(got)} are not eager's {sorted(want)}")
    if (len(want["scores"]) == 0) != (len(got["scores"]) == 0):
        raise ValueError(f"at {hw[0]}x{hw[1]} eager finds {len(want['scores'])} detections, the file "
                         f"{len(got['scores'])}")
    if len(want["scores"]) == 0:
        return 0.0, 0
    # detections within MARGIN of the cut may fall either side of it in the other run: not required
    cut = float(np.sort(want["scores"])[::-1][min(COMPARED, len(want["scores"])) - 1])
    worst = max(_matched(want, got, cut + MARGIN, cut - MARGIN, max(hw)),
                _matched(got, want, cut + 2 * MARGIN, cut - 2 * MARGIN, max(hw)))
    return worst, int((want["scores"] > cut + MARGIN).sum())


def check_detector_file(path: str, plain: nn.Module, names: List[str], sizes: Sequence[HW],
           tolerance: float) -> Tuple[float, int]:
    """Run the file at each of ``sizes`` against the plain detector: the largest difference, and
    how many detections were matched in all (0: none scored clearly above the others, as with a
    random-init model, so the check only saw the file run); ``ValueError`` beyond ``tolerance``."""
    session = open_session(path, quiet=True)
    results = [_compare(session, plain, names, hw, seed) for seed, hw in enumerate(sizes)]
    worst = max(error for error, _ in results)
    if worst > tolerance:
        raise ValueError(f"detections differ from eager by {worst:.2e} (tolerance {tolerance:.0e})")
    return worst, sum(n for _, n in results)


T = TypeVar("T")


def first_route_that_works(routes: Sequence[str], attempt: Callable[[str], T], refusal: Callable[[str], str]) -> T:
    """``attempt(route)`` for each exporter route in turn: the first that returns; when every one
    fails, a ``ValueError`` with ``refusal(reasons)``, the reasons naming each route's failure."""
    failures = []
    for route in routes:
        try:
            return attempt(route)
        except Exception as e:  # noqa: BLE001 - an exporter or the runtime fails in any type; each reason is reported
            failures.append(f"{route}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    raise ValueError(refusal("; ".join(failures)))


def write_detector_onnx(model: nn.Module, path: PathLike, scale: Scale, meta: Dict[str, str], *,
                        opset: int, check: bool, routes: Sequence[str] = EXPORTERS,
                        tolerance: float = 5e-3,
                        on_step: Callable[[str], None] = lambda label: None) -> Path:
    """Write scale ``scale``'s plain detector as ONNX (see the module doc), with ``meta`` as its
    metadata plus ``exporter`` (the route that ran) and ``max_error`` (the check's).

    Each route in ``routes`` is tried in turn; a route whose file fails in onnxruntime, or whose
    detections differ from eager beyond ``tolerance`` (``check``), counts as failed. When every
    route fails the error names each one's reason and nothing is written.
    """
    import onnx

    ctx = context_of(model)
    hw = ctx.sizes[ctx.index(scale)]
    plain = extract(model, scale).eval()
    image = structured_image(hw, 0)
    with torch.no_grad():
        names = list(plain([image])[0].keys())
    def attempt(tmp: str, route: str) -> None:
        _export(plain, image, names, tmp, opset, route)
        on_step(f"traced scale {scale_key(hw)} ({route})")
        checked = check_detector_file(tmp, plain, names, check_sizes(hw), tolerance) if check else None
        proto = onnx.load(tmp)
        props = {**meta, "exporter": route, "outputs": ",".join(names),
                 "input_layout": "one (3, H, W) image, any size (the transform resizes it)"}
        if checked is not None:
            props["max_error"], props["checked_detections"] = f"{checked[0]:.2e}", str(checked[1])
        onnx.helper.set_model_props(proto, {f"sct_convert.{k}": v for k, v in props.items()})
        onnx.save_model(proto, tmp)
        on_step("checked in onnxruntime" if check else "written")

    def refusal(reasons: str) -> str:
        return (f"no exporter writes a working ONNX file of {type(plain).__name__} at scale {scale_key(hw)} "
                f"with torch {torch.__version__}: {reasons}; nothing was written. The limit is upstream "
                "(torchvision's detector as it is); sct.save_per_scale writes checkpoints that load into the plain model")

    return atomic_write(path, lambda tmp: first_route_that_works(routes, functools.partial(attempt, tmp), refusal))


def _torchscript_core(core: nn.Module, x: torch.Tensor, names: List[str], opset: int) -> Any:
    """``core`` through the TorchScript-based exporter, every dim of every value dynamic."""
    import onnx

    class Flat(nn.Module):  # that exporter takes tuple outputs, not dicts
        def __init__(self) -> None:
            super().__init__()
            self.core = core

        def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            return tuple(self.core(images).values())

    buffer = io.BytesIO()
    with torch.no_grad():
        ranks = [v.dim() for v in core(x).values()]
    axes = {"images": [0, 2, 3], **{n: list(range(r)) for n, r in zip(names, ranks)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Flat().eval(), (x,), buffer, dynamo=False, opset_version=min(opset, 17),
                          input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def _core_error(got: Dict[str, np.ndarray], want: Dict[str, torch.Tensor]) -> float:
    """The largest difference of a core's outputs from eager's, relative to each output's size."""
    if list(got) != list(want):
        raise ValueError(f"the file's outputs {list(got)} are not the core's {list(want)}")
    return max(float(np.abs(got[k] - want[k].numpy()).max()) / max(float(want[k].abs().max()), 1e-6)
               for k in want)


def write_core_onnx(model: nn.Module, path: PathLike, scale: Any, meta: Dict[str, str], *, opset: int,
                    check: bool, routes: Sequence[str] = EXPORTERS, tolerance: float = 5e-3,
                    on_step: Callable[[str], None] = lambda label: None) -> Path:
    """Write a converted detector's core (:mod:`sct_convert.detection.split`) as ONNX: every scale,
    routed in the graph by the batch's shorter side (``scale=None``), or one scale's.

    Each scale's plain core is traced on its own with dynamic batch, height and width, through
    each of ``routes`` in turn until one works (the dynamo route first, whose branches share
    their conv weights). With ``check`` and onnxruntime, before the file is renamed into place,
    at every scale it serves three images (two orientations, one wide) are pre-processed (:func:`detector_preprocess`), run
    through the file and post-processed (:func:`detector_postprocess`), and compared with the
    eager core (raw outputs, relative error under ``1e-3``) and with the eager converted model at
    that scale (detections within ``tolerance``). A route whose file fails counts as failed;
    when all fail, nothing is written and the error names each one's reason.
    """
    import onnx

    from .onnx_trace import unfolded_onnx
    from ..detection.split import (DetectorCore, check_core_sides, core_example, core_sides, detector_core,
                                detector_postprocess, detector_preprocess)
    from ..core.model import scale as pinned_scale
    from .onnx_graph import switchable_model, write_onnx
    from .._utils.modes import run_mode
    from ..core.rule import onnx_core_route_nodes

    ctx = context_of(model)
    served = list(range(len(ctx.scales))) if scale is None else [ctx.index(scale)]
    sides = check_core_sides(model) if scale is None else core_sides(model)
    size_input = onnx.helper.make_tensor_value_info(SIZE_INPUT, onnx.TensorProto.INT64, [1])
    first = ctx.scales[served[0]]
    with torch.no_grad(), run_mode(model), pinned_scale(model, first):
        names = list(detector_core(model)(torch.zeros(1, 3, *core_example(model, first))))

    def branches(route: str) -> Any:
        for i in served:
            plain = DetectorCore(extract(model, ctx.scales[i])).eval()
            x = torch.randn(2, 3, *core_example(model, ctx.scales[i]))
            proto = unfolded_onnx(plain, x, opset, names) if route == "dynamo" else _torchscript_core(
                plain, x, names, opset)
            del plain
            on_step(f"traced the core of scale {scale_key(ctx.sizes[i])} ({route})")
            yield proto

    def verify(file: Path) -> Dict[str, str]:
        if not check:
            return {}
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return {}
        session = open_session(file, quiet=True)
        core, raw, worst, matched = detector_core(model), 0.0, 0.0, 0
        with torch.no_grad(), run_mode(model):
            for i in served:
                s, hw = ctx.scales[i], ctx.sizes[i]
                sizes = [*check_sizes(hw), (round(hw[0] * 0.35), hw[1])]  # and a wide one, whose long side is capped
                images = [structured_image(size, seed) for seed, size in enumerate(sizes)]
                batch = detector_preprocess(model, images, s)
                got = dict(zip(names, session.run(None, batch.feeds(switchable=scale is None))))
                with pinned_scale(model, s):
                    raw = max(raw, _core_error(got, core(batch.tensor)))
                    want = model(images)
                for one_got, one_want, size in zip(detector_postprocess(model, got, batch), want, sizes):
                    error, n = compare_detections(one_want, one_got, size)
                    worst, matched = max(worst, error), matched + n
                on_step(f"checked scale {scale_key(hw)} in onnxruntime")
        if raw > 1e-3 or worst > tolerance:
            raise ValueError(f"the core's outputs differ from eager by {raw:.2e} (tolerance 1e-03), its "
                             f"detections by {worst:.2e} (tolerance {tolerance:.0e})")
        return {"sct_convert.max_core_error": f"{raw:.2e}", "sct_convert.max_error": f"{worst:.2e}",
                "sct_convert.checked_detections": str(matched)}

    def attempt(route: str) -> Path:
        props = {**meta, "exporter": route, "outputs": ",".join(names), "sides": json.dumps(
            [sides[i] for i in served])}
        build = functools.partial(lambda store, route: switchable_model(
            branches(route), [ctx.sizes[i] for i in served], [scale_key(ctx.sizes[i]) for i in served], INPUT_NAME,
            store, router=lambda _, table, prefix: onnx_core_route_nodes(SIZE_INPUT, table, prefix),
            table=[sides[i] for i in served], extra_inputs=[size_input]), route=route)
        return write_onnx(path, build, {f"sct_convert.{k}": v for k, v in props.items()}, (), on_step, verify)

    return first_route_that_works(routes, attempt, lambda reasons: (
        f"no exporter writes a working ONNX core of {type(unwrap(model)).__name__} with torch {torch.__version__}: "
        f"{reasons}; nothing was written. Per-scale files of the whole detector (part='model', scale=...) and "
        "sct.save_per_scale checkpoints are the other ways to ship it"))
