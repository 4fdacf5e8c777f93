"""A converted model's scales and routing policy, and the per-call choice of branch.

A :class:`ScaleContext` is a plain object (not a module, so it never enters ``state_dict``)
holding what does not change from call to call: the scales, the routing policy, sampling
settings. The converted model and every S-BN layer hold the same instance; a
``copy.deepcopy`` or pickle of the model copies it once and keeps that sharing.

Which branch a call runs is *not* stored on the model. The model's forward records it in a
thread-local for the duration of the call and restores it after: every thread sees only its
own calls, so one model serves several sizes from many threads, and ``nn.DataParallel``
replicas, which share the model's attributes, route independently. ``sct.scale`` pins are a
ContextVar, so they hold for the calling thread or asyncio task only.
"""
import contextlib
import contextvars
import threading
import types
import weakref
import warnings
from typing import Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.fx

Scale = Union[int, Tuple[int, int]]
HW = Tuple[int, int]

ROUTING_POLICIES = ("nearest", "error")

#: Attribute of a converted model that holds its :class:`ScaleContext`.
CONTEXT_ATTR = "_sct_context"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def normalize_scale(scale: object) -> HW:
    """Return ``(h, w)`` for an int or an ``(h, w)`` pair; ``ValueError`` for anything else."""
    if _is_int(scale):
        hw = (scale, scale)
    elif isinstance(scale, (tuple, list)) and len(scale) == 2 and all(_is_int(v) for v in scale):
        hw = (int(scale[0]), int(scale[1]))
    else:
        raise ValueError(
            f"invalid scale {scale!r}: a scale is an int (square side, e.g. 224) "
            "or an (height, width) pair of ints, e.g. (128, 96)"
        )
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"invalid scale {scale!r}: sides must be positive")
    return hw


def scale_key(hw: HW) -> str:
    """Name of a scale's branch in ``state_dict`` keys and file names: ``224`` or ``128x96``."""
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def parse_scale_key(key: str) -> Scale:
    """Inverse of :func:`scale_key`."""
    if "x" in key:
        h, w = key.split("x")
        return (int(h), int(w))
    return int(key)


def normalize_scales(scales: Iterable[object]) -> Tuple[Tuple[Scale, ...], Tuple[HW, ...]]:
    """Validate a list of scales; return them as given (ints or tuples) and as ``(h, w)`` pairs."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise ValueError(f"scales must be a list of ints or (h, w) pairs, got {scales!r}")
    given = list(scales)
    if not given:
        raise ValueError("scales is empty: give at least one, e.g. scales=[224, 192, 128]")
    pairs = [normalize_scale(s) for s in given]
    seen: Dict[HW, object] = {}
    for s, hw in zip(given, pairs):
        if hw in seen:
            raise ValueError(f"duplicate scale {s!r} (same size as {seen[hw]!r}); each scale once")
        seen[hw] = s
    as_given = tuple(s if _is_int(s) else (int(s[0]), int(s[1])) for s in given)
    return as_given, tuple(pairs)


class Route(NamedTuple):
    """One call's branch: an ``int`` in eager mode, a 0-d ``long`` tensor when traced.

    ``pinned`` routes hold for the whole call (set by the model's forward, from the image's
    size, a ``sct.scale`` pin or a sampling step); an unpinned route is the entry layer's own
    choice for a call that did not come through the model's forward
    (``model.forward_features(x)``) and is replaced by the next such call.
    """

    index: object
    pinned: bool


_NO_ROUTES: Mapping["ScaleContext", object] = types.MappingProxyType({})

# The routes of the calls running in this thread. A thread-local, not a ContextVar: torch.compile
# traces its reads and writes without a graph break, and a forward never awaits, so
# setting it on entry and restoring it on exit cannot leak into another asyncio task.
class _Calls(threading.local):
    def __init__(self) -> None:  # runs once per thread: the attribute always exists (no guard flip)
        self.routes: Mapping["ScaleContext", Route] = _NO_ROUTES


_CALLS = _Calls()

# sct.scale pins, read once per call by the model's forward: a ContextVar, so a pin made in
# one asyncio task or thread is not seen by another.
_PINS: contextvars.ContextVar[Mapping["ScaleContext", int]] = contextvars.ContextVar(
    "sct_convert_pins", default=_NO_ROUTES)


def call_routes() -> Mapping["ScaleContext", Route]:
    """Routes of the calls this thread is running, by model context."""
    return _CALLS.routes


def set_call_routes(routes: Mapping["ScaleContext", Route]) -> None:
    _CALLS.routes = routes


def pinned_index(context: "ScaleContext") -> Optional[int]:
    """The branch ``sct.scale`` pinned for this thread / task, if any."""
    return _PINS.get().get(context)


@contextlib.contextmanager
def pinned(context: "ScaleContext", index: int) -> Iterator[None]:
    """Pin branch ``index`` for every call of ``context``'s model inside the block (this thread / task)."""
    token = _PINS.set({**_PINS.get(), context: index})
    try:
        yield
    finally:
        _PINS.reset(token)


def set_unpinned_route(context: "ScaleContext", index: object) -> None:
    """The entry layer's route for a call that did not come through the model's forward."""
    set_call_routes({**call_routes(), context: Route(index, False)})


def _is_traced(v: object) -> bool:
    """A size that is not a plain int: a SymInt (compile/export) or an FX Proxy."""
    return not isinstance(v, int)


class ScaleContext:
    """A converted model's scales, how input sizes pick a branch, and its sampling settings.

    Routing normally happens in the model's forward, on the image's own (H, W). A call that
    bypasses that forward (``model.forward_features(x)``, a graph traced from a submodule)
    is routed by the model's entry layer: its first S-BN, else (when that layer cannot tell
    the scales apart) a hook on the first layer that can. ``entry_sizes[i]`` is the spatial
    size the entry layer sees for an image at scale ``i``; conversion measures it, so
    strided stems and space-to-depth route correctly there too.

    Nothing here changes during a forward: the per-call branch is in :data:`_CALLS`.

    Args:
        scales: ints (square) or ``(height, width)`` pairs.
        unknown_scale: ``"nearest"`` or ``"error"``, for input sizes that are not a scale.
    """

    def __init__(self, scales: Sequence[object], unknown_scale: str = "nearest") -> None:
        if unknown_scale not in ROUTING_POLICIES:
            raise ValueError(
                f"unknown_scale={unknown_scale!r}: choose one of {', '.join(ROUTING_POLICIES)}"
            )
        self.unknown_scale = unknown_scale
        self.set_scales(*normalize_scales(scales))
        self.entry_sizes: List[HW] = list(self.sizes)
        self.sampling = True  # train-mode forward runs every scale (SCT's sampling phase)
        self.antialias = True  # antialias when sampling resizes down
        self.sample_subset: Optional[List[int]] = None  # indices; None: every scale
        self.scale_specific_bn = True  # False: shared norm layers, sampling only
        self._warned: set = set()

    def set_scales(self, scales: Tuple[Scale, ...], sizes: Tuple[HW, ...]) -> None:
        """Replace the scales (as given, and as ``(h, w)``); keys are kept precomputed for S-BN."""
        self.scales, self.sizes = tuple(scales), tuple(sizes)
        self.keys: Tuple[str, ...] = tuple(scale_key(hw) for hw in self.sizes)
        self._warned = set()

    def sample_indices(self) -> List[int]:
        """Scales a sampling forward runs, in the model's scale order."""
        return list(self.sample_subset) if self.sample_subset is not None else list(range(len(self.sizes)))

    def index(self, scale: object) -> int:
        """Position of ``scale`` in this model's scales; ``ValueError`` naming them if absent."""
        hw = normalize_scale(scale)
        try:
            return self.sizes.index(hw)
        except ValueError:
            raise ValueError(
                f"scale {scale!r} is not one of this model's scales {list(self.scales)}; "
                "add it with sct.add_scale or pick one of those"
            ) from None

    def route(self, hw: HW, table: Optional[Sequence[HW]] = None, where: str = "input") -> int:
        """Branch index for spatial size ``hw``: exact match, else nearest by pixel count.

        ``table`` holds each scale's size at the layer that routes (the image sizes by
        default, ``entry_sizes`` for the entry layer). Warns once per size under
        ``unknown_scale="nearest"``; ``ValueError`` under ``"error"``.
        """
        table = self.sizes if table is None else table
        for i, size in enumerate(table):
            if size == hw:
                return i
        what = "input size" if where == "input" else f"size {where}"
        if self.unknown_scale == "error":
            raise ValueError(
                f"{what} {tuple(hw)} matches none of the model's scales {list(self.scales)} "
                "and unknown_scale='error'; resize the input, force a branch with "
                "sct.scale(model, s), or convert with unknown_scale='nearest'"
            )
        pixels = hw[0] * hw[1]
        best = min(range(len(table)), key=lambda i: abs(pixels - table[i][0] * table[i][1]))
        if (hw, where) not in self._warned:
            self._warned.add((hw, where))
            warnings.warn(
                f"sct_convert: {what} {tuple(hw)} is not a trained scale; using the nearest "
                f"branch {self.scales[best]!r} (by pixel count). Pass unknown_scale='error' to "
                "refuse such inputs.",
                stacklevel=4,
            )
        return best

    def route_shape(self, x: torch.Tensor, table: Optional[Sequence[HW]] = None,
                    where: str = "input") -> object:
        """:meth:`route` for ``x``'s concrete size; an in-graph index tensor for a symbolic one.

        Under ``torch.compile``/``torch.export`` with dynamic H and W the branch is computed
        in the graph (exact match first, else nearest by pixel count, as in eager), so one
        graph serves every size. An in-graph route cannot refuse or warn: a traced model
        always takes the nearest branch.
        """
        h, w = x.shape[-2], x.shape[-1]
        # Under dynamo a Python route would guard on the size and compile one graph per scale.
        if not (_is_traced(h) or _is_traced(w) or torch.compiler.is_compiling()):
            return self.route((h, w), table, where)
        rows = [list(hw) for hw in (self.sizes if table is None else table)]
        if isinstance(x, torch.fx.Proxy):
            return fx_route_index(x, rows, self.fx_key())
        return route_index(x, rows)

    def fx_key(self) -> int:
        """A key an FX graph can hold (an int) to reach this context at run time."""
        _LIVE_CONTEXTS[id(self)] = self
        return id(self)

    def __repr__(self) -> str:
        return f"ScaleContext(scales={list(self.scales)}, unknown_scale={self.unknown_scale!r})"


def route_index(x: torch.Tensor, table: List[List[int]]) -> torch.Tensor:
    """Branch index (0-d ``long`` tensor) for ``x``'s size, with no Python branching.

    Exact ``(h, w)`` match first, else nearest by pixel count; ``table`` is each scale's size.
    Traceable by torch.export / dynamo with symbolic sizes, one node under torch.fx, and
    scriptable, so a traced graph scripts.
    """
    sizes = torch.tensor(table, dtype=torch.long, device=x.device)
    h = torch.full([1], x.shape[-2], dtype=torch.long, device=x.device)
    w = torch.full([1], x.shape[-1], dtype=torch.long, device=x.device)
    exact = (sizes[:, 0] == h) & (sizes[:, 1] == w)
    gap = (sizes[:, 0] * sizes[:, 1] - h * w).abs()
    return torch.where(exact, torch.full_like(gap, -1), gap).argmin()


# Contexts that FX graphs route for, by fx_key; weak, so a graph does not keep a model alive.
_LIVE_CONTEXTS: "weakref.WeakValueDictionary[int, ScaleContext]" = weakref.WeakValueDictionary()


@torch.jit.ignore
def publish_route(key: int, index: int) -> None:
    """At a traced graph's run time: tell S-BN layers inside tracer-leaf modules (which run
    eagerly, outside the graph's own ops) the branch of this call. Unpinned: the next eager
    call of the model routes afresh."""
    context = _LIVE_CONTEXTS.get(key)
    if context is not None:
        set_unpinned_route(context, index)


def fx_route_index(x: torch.Tensor, table: List[List[int]], key: int) -> torch.Tensor:
    """:func:`route_index` as one FX node, that also publishes the branch for leaf modules."""
    index = route_index(x, table)
    if torch.jit.is_scripting():
        return index
    publish_route(key, int(index))
    return index


def fx_publish_route(x: torch.Tensor, key: int, index: int) -> torch.Tensor:
    """One FX node per sampled scale in a train-mode graph: publishes that scale's branch."""
    if not torch.jit.is_scripting():
        publish_route(key, index)
    return x


torch.fx.wrap("route_index")
torch.fx.wrap("fx_route_index")
