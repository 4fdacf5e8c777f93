"""The call route: which branch one call of a converted model runs, and at what size.

:mod:`sct_convert.core.rule` holds the rule (a size -> a branch). This module holds how a call
gets its route, written once:

- :class:`Route`: the branch (an index, a ``Blend``, or index tensors in a traced graph), the
  size the call runs at (``None``: the input's own), and whether it holds for the whole call.
- :func:`resolve`: the order of precedence. First the route of an enclosing call of the same
  model in this thread (a nested call keeps its caller's route); then a pin (``sct.scale``,
  ``train_step``'s and ``calibrate``'s per-scale runs); then, in train mode with sampling on,
  :data:`SAMPLE` (the caller runs each scale, each under its own route); then the size the
  model's own resizer (a torchvision detection transform) resizes to; then the image's size;
  last, for a layer that runs outside any call of the model, the entry layer's choice.
- :func:`call_with`: run a function with a route set for this thread, restored after.
- :func:`pinned`: hold a route for every call inside a block (this thread / asyncio task).

The eval forward (:func:`routed_forward`), the S-BN layer, the entry router, the detection
transform, ``train_step`` and ``calibrate`` all use these; none keeps an order of its own.
Nothing is stored on the model: the routes of running calls live in a thread-local, pins in a
ContextVar, so threads and asyncio tasks route independently.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import types
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.fx
from torch import nn

from .context import ScaleContext, live_context
from .resizer import transform_size
from .rule import Blend, RouteIndex, blend_in_graph, choose_in_graph, find_image, route_size
from .scales import HW


class Route(NamedTuple):
    """One call's route.

    Attributes:
        branch: an ``int`` or a ``routing.Blend`` in eager mode; index tensors when traced.
        size: the ``(h, w)`` the call runs at, where the call itself sets it (an ``sct.scale``
            pin: the scale; a sampling run: the sampled size). A model that resizes its own input
            (a detection transform) resizes to it. ``None``: the input's own size.
        held: the route holds for the whole call (set by the model's forward or a pin); an
            unheld route is the entry layer's choice for a call that did not come through the
            model's forward (``model.forward_features(x)``), replaced by the next such call.
    """

    branch: RouteIndex
    size: Optional[HW] = None
    held: bool = True


#: What :func:`resolve` answers for a train-mode call that samples every scale.
SAMPLE = Route(-1, None, False)

_NONE: Mapping[ScaleContext, Route] = types.MappingProxyType({})


# The routes of the calls running in this thread. A thread-local, not a ContextVar: torch.compile
# traces its reads and writes without a graph break, and a forward never awaits, so setting it on
# entry and restoring it on exit cannot leak into another asyncio task.
class _Calls(threading.local):
    def __init__(self) -> None:  # runs once per thread: the attribute always exists (no guard flip)
        self.routes: Mapping[ScaleContext, Route] = _NONE


_CALLS = _Calls()

# Pins, read once per call: a ContextVar, so a pin made in one asyncio task or thread is not seen
# by another.
_PINS: contextvars.ContextVar[Mapping[ScaleContext, Route]] = contextvars.ContextVar(
    "sct_convert_pins", default=_NONE)


def pin_of(ctx: ScaleContext) -> Optional[Route]:
    """The route pinned for ``ctx``'s model in this thread / task, if any."""
    return _PINS.get().get(ctx)


def scale_route(ctx: ScaleContext, index: int) -> Route:
    """The route of trained scale ``index``: its branch, at its size."""
    return Route(index, ctx.sizes[index])


@contextlib.contextmanager
def pinned(ctx: ScaleContext, route: Route) -> Iterator[None]:
    """Every call of ``ctx``'s model inside the block runs ``route`` (this thread / task only)."""
    token = _PINS.set({**_PINS.get(), ctx: route._replace(held=True)})
    try:
        yield
    finally:
        _PINS.reset(token)


def resolve(ctx: ScaleContext, *, image: Any = None, resizer: Optional[nn.Module] = None,
            sampling: bool = False, table: Optional[Sequence[HW]] = None,
            where: str = "input") -> Optional[Route]:
    """The route of a call, by the one order of precedence (see the module doc).

    Args:
        ctx: the model's context.
        image: the call's image tensor (:func:`routing.find_image`), if the caller has one.
        resizer: the model's module that resizes its input (a detection transform), if any.
        sampling: the call is a train-mode forward that samples every scale.
        table: each scale's size where ``image`` is read (default: the image sizes).
        where: what the size is of, for messages.

    Returns:
        A :class:`Route`, :data:`SAMPLE`, or ``None`` when nothing decides (no image, no resizer,
        no call in progress).
    """
    route = _CALLS.routes.get(ctx)
    if route is not None and route.held:
        return route
    pin = _PINS.get().get(ctx)
    if pin is not None:
        return pin
    if sampling and (resizer is not None or image is not None):
        return SAMPLE
    if resizer is not None:
        return Route(route_size(ctx, transform_size(resizer), where=f"of '{ctx.resizer}'"))
    if image is not None:
        return Route(route_tensor(ctx, image, table, where))
    return route


def call_with(ctx: ScaleContext, route: Route, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with ``route`` as the route of ``ctx``'s call in this thread;
    the previous routes are restored after, whatever happens."""
    routes = _CALLS.routes
    _CALLS.routes = {**routes, ctx: route}
    try:
        return fn(*args, **kwargs)
    finally:
        _CALLS.routes = routes


def set_entry_route(ctx: ScaleContext, branch: Any) -> None:
    """The entry layer's (unheld) route for a call that did not come through the model's forward."""
    _CALLS.routes = {**_CALLS.routes, ctx: Route(branch, None, False)}


def routed_forward(model: nn.Module, forward: Callable[..., Any], ctx: ScaleContext,
                   route: Optional[Route], args: tuple, kwargs: Dict[str, Any]) -> Any:
    """The eval forward: the model's own ``forward`` under ``route``. With no route, or only the
    entry layer's choice for an earlier call, it runs unrouted and the entry layer routes from
    what reaches it (a call whose inputs hold no image)."""
    if route is None or not route.held:
        return forward(model, *args, **kwargs)
    return call_with(ctx, route, forward, model, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The route of a tensor, eagerly or in a traced graph


@torch.jit.ignore
def _publish(key: int, chosen: Any) -> None:
    """At a traced graph's run time: tell S-BN layers inside tracer-leaf modules (which run
    eagerly, outside the graph's own ops) the route of this call. Unheld: the next eager call
    of the model routes afresh."""
    ctx = live_context(key)
    if ctx is None:
        return
    if isinstance(chosen, tuple):
        low, high, t = int(chosen[0]), int(chosen[1]), float(chosen[2])
        chosen = low if low == high else Blend(low, high, t)
    set_entry_route(ctx, int(chosen) if isinstance(chosen, torch.Tensor) else chosen)


def fx_choose(x: torch.Tensor, table: List[List[int]], key: int) -> torch.Tensor:
    """:func:`routing.choose_in_graph` as one FX node that also publishes the route to leaf modules."""
    chosen = choose_in_graph(x, table)
    if not torch.jit.is_scripting():
        _publish(key, chosen)
    return chosen


def fx_blend(x: torch.Tensor, table: List[List[int]], key: int) -> Any:
    """:func:`routing.blend_in_graph` as one FX node that also publishes the route to leaf modules."""
    chosen = blend_in_graph(x, table)
    if not torch.jit.is_scripting():
        _publish(key, chosen)
    return chosen


def fx_pin(x: torch.Tensor, key: int, index: int) -> torch.Tensor:
    """One FX node per sampled scale of a train-mode graph: tells leaf modules that scale."""
    if not torch.jit.is_scripting():
        _publish(key, index)
    return x


for _name in ("fx_choose", "fx_blend", "fx_pin"):
    torch.fx.wrap(_name)  # patches this module's globals while tracing: call them from here only


def pin_in_graph(ctx: ScaleContext, x: torch.fx.Proxy, index: int) -> torch.fx.Proxy:
    """``x`` through an :func:`fx_pin` node: a traced train-mode graph tells the S-BNs inside leaf
    modules the scale ``index`` at run time, before they run."""
    return fx_pin(x, ctx.fx_key(), index)


def route_tensor(ctx: ScaleContext, x: torch.Tensor, table: Optional[Sequence[HW]] = None,
                 where: str = "input") -> RouteIndex:
    """The branch for ``x``'s (H, W): Python when the size is concrete, graph ops when symbolic.

    Under dynamo a Python route would guard on the size and compile one graph per scale, so a
    compiled call always routes in the graph. An in-graph route cannot refuse or warn.
    """
    h, w = x.shape[-2], x.shape[-1]
    if isinstance(h, int) and isinstance(w, int) and not torch.compiler.is_compiling():
        return route_size(ctx, (h, w), table, where)
    rows = [list(hw) for hw in (ctx.sizes if table is None else table)]
    interpolate = ctx.unknown_scale == "interpolate"
    if isinstance(x, torch.fx.Proxy):
        if not interpolate:
            return fx_choose(x, rows, ctx.fx_key())
        chosen = fx_blend(x, rows, ctx.fx_key())  # one proxy: unpack into three graph values
        return chosen[0], chosen[1], chosen[2]
    return (blend_in_graph if interpolate else choose_in_graph)(x, rows)


class EntryRouter:
    """Forward pre-hook on the model's entry layer (a picklable callable).

    Routes a call that reached the entry layer without going through the model's forward, on
    the size that reaches the entry (looked up in ``context.entry_sizes``) or the resizer's size;
    the route holds until the next such call in this thread. Inside a call of the model, or
    under a pin, it does nothing: :func:`resolve` already answers there.
    """

    def __init__(self, context: ScaleContext) -> None:
        self.context = context

    def __call__(self, module: nn.Module, args: tuple) -> None:
        ctx = self.context
        route = _CALLS.routes.get(ctx)
        if (route is not None and route.held) or _PINS.get().get(ctx) is not None:
            return
        resizer = module if ctx.resizer else None
        image = None if resizer is not None else find_image(args, {})
        route = resolve(ctx, image=image, resizer=resizer, table=ctx.entry_sizes,
                        where=f"at layer '{ctx.entry_name}'")
        if route is not None:
            set_entry_route(ctx, route.branch)
