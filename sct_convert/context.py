"""A converted model's scales and settings, and the per-call record of its branch.

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
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.fx

Scale = Union[int, Tuple[int, int]]
HW = Tuple[int, int]

ROUTING_POLICIES = ("nearest", "error", "interpolate")

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
    """One call's route (what :mod:`sct_convert.routing` chose) and whether it holds for the call.

    ``index`` is an ``int`` or a ``routing.Blend`` in eager mode, index tensors when traced.
    ``pinned`` routes hold for the whole call (set by the model's forward, from the image's
    size, a ``sct.scale`` pin or a sampling step); an unpinned route is the entry layer's own
    choice for a call that did not come through the model's forward
    (``model.forward_features(x)``) and is replaced by the next such call. ``size`` is the size a
    model that resizes its own input (a detection transform) resizes to in this call, set by
    ``sct.scale`` pins and sampling; ``None`` keeps the model's own size.
    """

    index: Any
    pinned: bool
    size: Optional[HW] = None


_NO_ROUTES: Mapping["ScaleContext", Any] = types.MappingProxyType({})


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


@contextlib.contextmanager
def pinned(context: "ScaleContext", index: int) -> Iterator[None]:
    """Pin branch ``index`` for every call of ``context``'s model inside the block (this thread / task)."""
    token = _PINS.set({**_PINS.get(), context: index})
    try:
        yield
    finally:
        _PINS.reset(token)


def set_unpinned_route(context: "ScaleContext", index: Any) -> None:
    """The entry layer's route for a call that did not come through the model's forward."""
    set_call_routes({**call_routes(), context: Route(index, False)})


@dataclass(eq=False)  # identity equality and hash: contexts key the per-call route maps
class ScaleContext:
    """A converted model's scales, routing policy, entry layer and sampling settings.

    The converted model and every S-BN layer hold the same instance. Nothing here changes
    during a forward: the per-call branch is in a thread-local (:func:`call_routes`).

    Args:
        scales: ints (square) or ``(height, width)`` pairs, as given to ``convert``.
        unknown_scale: ``"nearest"``, ``"error"`` or ``"interpolate"`` (see
            :mod:`sct_convert.routing`), for input sizes that are not a scale.
        entry_name: the model's entry layer, which routes calls that bypass the model's forward.
        entry_sizes: the spatial size the entry layer sees for an image at each scale.
        probe_lead: the leading dims of an input, ``(N, C)`` or ``(N, C, T)`` for clips.
        sampling: a train-mode forward runs every scale (SCT's sampling phase).
        antialias: antialias when sampling resizes down.
        sample_subset: indices of the scales sampling runs; ``None`` for all.
        sample_between: sampling also runs one random size between the trained scales.
        scale_specific_bn: ``False`` for shared norm layers (sampling only).
        report: what ``convert`` found (a ``ConversionReport``).
        hook_id: id of the entry router's hook, when the entry layer is not an S-BN.
        resizer: the module that resizes the model's input itself (a torchvision detection
            transform), ``""`` for none; when set, a call routes by that module's size.
    """

    scales: Tuple[Scale, ...]
    unknown_scale: str = "nearest"
    entry_name: str = ""
    entry_sizes: List[HW] = field(default_factory=list)
    probe_lead: Tuple[int, ...] = (1, 3)
    sampling: bool = True
    antialias: bool = True
    sample_subset: Optional[List[int]] = None
    sample_between: bool = False
    scale_specific_bn: bool = True
    report: Any = None
    hook_id: Optional[int] = None
    resizer: str = ""
    sizes: Tuple[HW, ...] = field(init=False)
    keys: Tuple[str, ...] = field(init=False)
    warned: Set[Any] = field(init=False, repr=False)  # sizes already warned about

    def __post_init__(self) -> None:
        if self.unknown_scale not in ROUTING_POLICIES:
            raise ValueError(
                f"unknown_scale={self.unknown_scale!r}: choose one of {', '.join(ROUTING_POLICIES)}"
            )
        self.set_scales(*normalize_scales(self.scales))
        if not self.entry_sizes:
            self.entry_sizes = list(self.sizes)

    def set_scales(self, scales: Tuple[Scale, ...], sizes: Tuple[HW, ...]) -> None:
        """Replace the scales (as given, and as ``(h, w)``); keys are kept precomputed for S-BN."""
        self.scales, self.sizes = tuple(scales), tuple(sizes)
        self.keys = tuple(scale_key(hw) for hw in self.sizes)
        self.warned = set()

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

    def pinned_index(self) -> Optional[int]:
        """The branch ``sct.scale`` pinned for this thread / task, if any."""
        return _PINS.get().get(self)

    def fx_key(self) -> int:
        """A key an FX graph can hold (an int) to reach this context at run time."""
        _LIVE_CONTEXTS[id(self)] = self
        return id(self)


# Contexts that FX graphs route for, by fx_key; weak, so a graph does not keep a model alive.
_LIVE_CONTEXTS: "weakref.WeakValueDictionary[int, ScaleContext]" = weakref.WeakValueDictionary()


@torch.jit.ignore
def live_context(key: int) -> Optional[ScaleContext]:
    """The context an FX graph's ``fx_key`` names, while its model is alive."""
    return _LIVE_CONTEXTS.get(key)
