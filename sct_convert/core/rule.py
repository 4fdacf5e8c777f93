"""Which branch a call runs: the one rule, its backends side by side, and the one entry.

The rule, for an input of spatial size ``(h, w)`` and a model trained at ``sizes``:

1. a trained size, matched exactly on ``(h, w)``, runs its own branch;
2. otherwise, under ``unknown_scale="interpolate"``, a size whose pixel count lies strictly
   between two trained scales runs a :class:`Blend` of the two bracketing branches: every BN
   tensor (weight, bias, running mean and variance) interpolated linearly in pixel count;
3. otherwise the nearest scale by pixel count runs (ties to the scale listed first), or, under
   ``unknown_scale="error"``, the call is refused.

Backends, each the same rule: :func:`choose` (Python ints, eager), :func:`choose_in_graph`
(torch ops: FX, ``torch.compile``, ``torch.export``), :func:`script_choose` (TorchScript,
nearest only) and :func:`onnx_route_nodes` (ONNX, nearest only: an ONNX file of an
``interpolate`` model routes to the nearest branch and says so in its metadata). A detector's
core, which takes the batch its transform pads (whose shape does not tell the scale: images of
both orientations pad to a square), is told the side its batch was resized to, and takes the
nearest scale's branch: :func:`core_index`, and :func:`onnx_core_route_nodes` in ONNX.

The entry: :func:`find_image` reads the spatial size from whatever the model was called with
(a batch, a 5-d clip ``(N, C, T, H, W)``, a list of same-size images, a dict), always on the
last two dims. How a call gets its route (nested calls, pins, sampling, the detection
transform, the entry layer) is :mod:`sct_convert.core.route`; this module holds no state.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.fx

from .context import ScaleContext
from .scales import HW, pixels as _pixels


class UnknownSizeWarning(UserWarning):
    """An input size that is not a trained scale ran the nearest branch (warned once per size)."""


class Blend(NamedTuple):
    """A route between two branches: BN tensors ``lerp(branch[low], branch[high], t)``."""

    low: int
    high: int
    t: float


class ScaleBlend(NamedTuple):
    """What :func:`sct_convert.route` answers for a blended size: the two scales and the weight."""

    low: Any
    high: Any
    t: float


#: What a route is: a branch index; a :class:`Blend`; in a traced graph a 0-d index tensor, or
#: ``(low, high, t)`` tensors under ``interpolate``.
RouteIndex = Union[int, Blend, torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# The rule, in Python


def exact_index(hw: HW, sizes: Sequence[HW]) -> Optional[int]:
    """Position of ``hw`` in ``sizes``, if there."""
    for i, size in enumerate(sizes):
        if tuple(size) == tuple(hw):
            return i
    return None


def nearest_index(hw: HW, sizes: Sequence[HW]) -> int:
    """The size nearest ``hw`` by pixel count; ties to the one listed first."""
    pixels = _pixels(hw)
    return min(range(len(sizes)), key=lambda i: abs(_pixels(sizes[i]) - pixels))


def bracket(hw: HW, sizes: Sequence[HW]) -> Optional[Blend]:
    """The two sizes around ``hw`` by pixel count and ``hw``'s place between them.

    ``low`` is the largest size below ``hw``'s pixel count, ``high`` the smallest above (each the
    first listed among equals); ``None`` when ``hw`` is not strictly inside the trained range.
    """
    pixels = _pixels(hw)
    counts = [_pixels(s) for s in sizes]
    below = [i for i, p in enumerate(counts) if p < pixels]
    above = [i for i, p in enumerate(counts) if p > pixels]
    if not below or not above:
        return None
    low = max(below, key=lambda i: (counts[i], -i))
    high = min(above, key=lambda i: (counts[i], i))
    return Blend(low, high, (pixels - counts[low]) / (counts[high] - counts[low]))


def choose(hw: HW, sizes: Sequence[HW], policy: str) -> Optional[Union[int, Blend]]:
    """The rule: the branch (or blend) for ``hw``; ``None`` when ``policy`` is ``"error"`` and
    ``hw`` is not a trained size."""
    index = exact_index(hw, sizes)
    if index is not None:
        return index
    if policy == "error":
        return None
    if policy == "interpolate":
        blend = bracket(hw, sizes)
        if blend is not None:
            return blend
    return nearest_index(hw, sizes)


def route_size(context: ScaleContext, hw: HW, table: Optional[Sequence[HW]] = None,
               where: str = "input", warn: bool = True) -> Union[int, Blend]:
    """:func:`choose` under ``context``'s policy; warns once per size (``warn``), or raises ``ValueError``.

    ``table`` holds each scale's size at the layer that routes (the image sizes by default,
    ``context.entry_sizes`` at the entry layer).
    """
    hw = (int(hw[0]), int(hw[1]))
    table = context.sizes if table is None else table
    choice = choose(hw, table, context.unknown_scale)
    what = "input size" if where == "input" else f"size {where}"
    if choice is None:
        raise ValueError(
            f"{what} {hw} matches none of the model's scales {list(context.scales)} "
            "and unknown_scale='error'; resize the input, force a branch with "
            "sct.scale(model, s), or convert with unknown_scale='nearest'"
        )
    if warn and isinstance(choice, int) and table[choice] != hw and (hw, where) not in context.warned:
        context.warned.add((hw, where))
        warnings.warn(
            f"sct_convert: {what} {hw} is not a trained scale; using the nearest branch "
            f"{context.scales[choice]!r} (by pixel count). Pass unknown_scale='error' to refuse "
            "such inputs, or 'interpolate' to blend the two nearest branches.",
            UnknownSizeWarning, stacklevel=7,
        )
    return choice


# ---------------------------------------------------------------------------------------------
# The rule, in torch ops (FX, torch.compile, torch.export)


def _graph_terms(x: torch.Tensor, table: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scale: pixel count and exact-size match for ``x``'s last two dims; ``x``'s pixel count."""
    sizes = torch.tensor(table, dtype=torch.long, device=x.device)
    h = torch.full([1], x.shape[-2], dtype=torch.long, device=x.device)
    w = torch.full([1], x.shape[-1], dtype=torch.long, device=x.device)
    return sizes[:, 0] * sizes[:, 1], (sizes[:, 0] == h) & (sizes[:, 1] == w), h * w


def choose_in_graph(x: torch.Tensor, table: List[List[int]]) -> torch.Tensor:
    """:func:`choose` (nearest) on ``x``'s last two dims, as a 0-d ``long`` index tensor with no
    Python branching: traceable with symbolic sizes by torch.export and dynamo, one node under
    torch.fx, and scriptable."""
    pixels, exact, here = _graph_terms(x, table)
    gap = (pixels - here).abs()
    return torch.where(exact, torch.full_like(gap, -1), gap).argmin()


def blend_in_graph(x: torch.Tensor, table: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`choose` under ``interpolate`` in graph ops: ``(low, high, t)``, two 0-d index tensors
    and a float weight; ``low == high`` and ``t == 0`` at a trained size and outside the range."""
    pixels, exact, here = _graph_terms(x, table)
    gap = (pixels - here).abs()
    nearest = torch.where(exact, torch.full_like(gap, -1), gap).argmin()
    below, above = pixels < here, pixels > here
    low = torch.where(below, pixels, torch.full_like(pixels, -1)).argmax()  # first among equals
    high = torch.where(above, pixels, torch.full_like(pixels, 2**62)).argmin()
    inside = below.any() & above.any() & ~exact.any()
    low, high = torch.where(inside, low, nearest), torch.where(inside, high, nearest)
    # index_select, not pixels[high]: indexing by a 0-d tensor is data-dependent to torch.export < 2.9
    at_low, at_high = pixels.index_select(0, low.reshape(1))[0], pixels.index_select(0, high.reshape(1))[0]
    span = (at_high - at_low).clamp(min=1).to(torch.float32)
    t = torch.where(inside, (here[0] - at_low).to(torch.float32) / span, torch.zeros_like(span))
    return low, high, t


for _name in ("choose_in_graph", "blend_in_graph"):
    torch.fx.wrap(_name)  # one node each under torch.fx


# ---------------------------------------------------------------------------------------------
# The rule, in TorchScript and in ONNX (nearest only)


def script_choose(h: int, w: int, sizes: List[List[int]], nearest: bool = True) -> int:
    """:func:`choose` in TorchScript: exact, else nearest by pixel count (``-1`` if not ``nearest``)."""
    for i, hw in enumerate(sizes):
        if hw[0] == h and hw[1] == w:
            return i
    index = -1
    if nearest:
        best = -1
        for i, hw in enumerate(sizes):
            gap = abs(h * w - hw[0] * hw[1])
            if best < 0 or gap < best:
                best, index = gap, i
    return index


def absolute_nodes(value: str, out: str) -> list:
    """ONNX nodes for ``out = |value|`` on int64 as ``Max(value, -value)``, the one form both
    onnxruntime and OpenVINO 2026.4's CPU plugin compute right: that plugin runs int64 as int32
    and leaves ``Abs`` of a negative value negative, and ``value * value`` overflows there for
    pixel-count gaps over 46,340 (256 px against 128 px), either of which routes an input to the
    wrong branch with no error."""
    from onnx import helper

    return [helper.make_node("Neg", [value], [out + "_neg"], name=out + "_neg"),
            helper.make_node("Max", [value, out + "_neg"], [out], name=out)]


def onnx_route_nodes(input_name: str, sizes: Sequence[HW], prefix: str) -> Tuple[list, list]:
    """ONNX nodes computing ``<prefix>index`` (0-d int64) from the input's last two dims: exact
    size first, else nearest by pixel count (``ArgMin`` keeps the first of equal gaps)."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    def const(name: str, values: Sequence[int]) -> TensorProto:
        return numpy_helper.from_array(np.asarray(values, dtype=np.int64), prefix + name)

    r = prefix
    constants = [
        const("heights", [h for h, _ in sizes]), const("widths", [w for _, w in sizes]),
        const("pixels", [h * w for h, w in sizes]), const("h_axis", [-2]), const("w_axis", [-1]),
        const("exact_score", [-1]),
    ]
    node = helper.make_node
    nodes = [
        node("Shape", [input_name], [r + "shape"], name=r + "shape"),
        node("Gather", [r + "shape", r + "h_axis"], [r + "h"], axis=0, name=r + "h"),
        node("Gather", [r + "shape", r + "w_axis"], [r + "w"], axis=0, name=r + "w"),
        node("Mul", [r + "h", r + "w"], [r + "hw"], name=r + "hw"),
        node("Sub", [r + "pixels", r + "hw"], [r + "diff"], name=r + "diff"),
        *absolute_nodes(r + "diff", r + "gap"),
        node("Equal", [r + "heights", r + "h"], [r + "same_h"], name=r + "same_h"),
        node("Equal", [r + "widths", r + "w"], [r + "same_w"], name=r + "same_w"),
        node("And", [r + "same_h", r + "same_w"], [r + "exact"], name=r + "exact"),
        node("Where", [r + "exact", r + "exact_score", r + "gap"], [r + "score"], name=r + "score"),
        node("ArgMin", [r + "score"], [r + "index"], axis=0, keepdims=0, name=r + "index"),
    ]
    return nodes, constants


def core_index(side: int, sides: Sequence[int]) -> int:
    """A detector core's rule (:mod:`sct_convert.detection.split`): the scale whose side (the
    transform's resize target) is nearest ``side``; ties to the one listed first."""
    return min(range(len(sides)), key=lambda i: abs(int(sides[i]) - int(side)))


def onnx_core_route_nodes(size_input: str, sides: Sequence[int], prefix: str) -> Tuple[list, list]:
    """:func:`core_index` as ONNX nodes computing ``<prefix>index`` (0-d int64) from the file's
    ``size_input`` (int64, shape ``[1]``); ``ArgMin`` keeps the first of equal gaps."""
    from onnx import helper, numpy_helper
    import numpy as np

    r = prefix
    constants = [numpy_helper.from_array(np.asarray(list(sides), dtype=np.int64), r + "sides")]
    node = helper.make_node
    nodes = [
        node("Sub", [r + "sides", size_input], [r + "diff"], name=r + "diff"),
        *absolute_nodes(r + "diff", r + "gap"),
        node("ArgMin", [r + "gap"], [r + "index"], axis=0, keepdims=0, name=r + "index"),
    ]
    return nodes, constants


# ---------------------------------------------------------------------------------------------
# The entry: find the image in a call's inputs, route the call


def _spatial(v: Any) -> Optional[HW]:
    if isinstance(v, torch.Tensor) and not isinstance(v, torch.fx.Proxy) and v.dim() >= 3:
        return (v.shape[-2], v.shape[-1])
    return None


def find_image(args: tuple, kwargs: Dict[str, Any], name: Optional[str] = None) -> Any:
    """The first input's image tensor: a batch ``(N, C, H, W)``, a clip ``(N, C, T, H, W)``, the
    first of a list or tuple of same-size images, or the first image-like value of a dict, by
    position or as keyword ``name``. An FX proxy is returned as is (its size is symbolic).
    ``None`` when there is no such tensor, or when a list's images differ in size."""
    x = args[0] if args else (kwargs.get(name) if name is not None else None)
    if isinstance(x, torch.fx.Proxy) or _spatial(x) is not None:
        return x
    if isinstance(x, dict):
        x = [v for v in x.values() if _spatial(v) is not None]
    if isinstance(x, (list, tuple)) and x and all(_spatial(v) is not None for v in x):
        if len({_spatial(v) for v in x}) == 1:
            return x[0]
    return None
