"""The converted model's forward: routing by input size, and SCT's scale-sampling phase.

``convert`` swaps the model's class for a generated subclass whose ``forward`` is
:func:`converted_forward`. In eval mode (or with sampling off) it picks the branch from the
image's (H, W) and pins it for the duration of the call; in train mode it calls the model's
own ``forward`` once per scale, on the batch resized to that scale with that scale's branch
pinned, and returns :class:`ScaleOutputs`. A branch pinned by ``sct.scale`` runs the model's
own forward unchanged. Nothing is written to the model: the route lives in a ContextVar.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .context import CONTEXT_ATTR, HW, Route, Scale, call_routes, fx_publish_route, pinned_index, set_call_routes


#: Tensor methods that act on each output alike: on ScaleOutputs they apply to every scale.
PER_SCALE_METHODS = frozenset({
    "to", "cpu", "cuda", "float", "half", "double", "bfloat16", "detach", "clone", "contiguous",
    "requires_grad_", "argmax", "softmax", "log_softmax", "sigmoid", "view", "reshape",
    "flatten", "squeeze", "unsqueeze", "type_as", "float_", "to_dense",
})


class ScaleOutputs(tuple):
    """The model's outputs, one per sampled scale, in the model's scale order.

    A tuple (index it, iterate it, ``len``), plus ``.scales``, ``.by_scale()`` and ``.primary``
    (the first scale's output). Tensor methods that act on each output alike (``.to``,
    ``.float``, ``.detach``, ``.argmax``, ``.softmax``, ...) apply to every scale and return
    ``ScaleOutputs``. Anything that would use one scale and drop the others (``.sum()``,
    ``.backward()``, ``.item()``, ``.shape``, ``outputs == labels``, ``outputs * 2``) raises: use
    :class:`sct_convert.SCTLoss` for the loss, ``.primary`` or ``.by_scale()`` for one scale.

    ``ScaleOutputs(values, scales)`` builds one; ``type(outputs)(values)`` (how libraries such
    as Accelerate rebuild containers) keeps ``outputs``'s scales.

    Args:
        outputs: one output per scale.
        scales: the scale of each output (required on the base class).
    """

    scales: Tuple[Scale, ...]
    _default_scales: Optional[Tuple[Scale, ...]] = None

    def __new__(cls, outputs: Iterable[Any], scales: Optional[Sequence[Scale]] = None) -> "ScaleOutputs":
        values = tuple(outputs)
        if scales is None:
            scales = cls._default_scales
        if scales is None:
            raise TypeError("ScaleOutputs(values, scales): give the scale of each output")
        scales = tuple(scales)
        if len(scales) != len(values):
            raise ValueError(f"{len(values)} outputs for {len(scales)} scales")
        obj = super().__new__(scaled_type(scales), values)
        obj.scales = scales
        return obj

    def __reduce__(self):
        return (ScaleOutputs, (tuple(self), self.scales))

    def by_scale(self) -> Dict[Scale, Any]:
        return dict(zip(self.scales, self))

    @property
    def primary(self) -> Any:
        """The first scale's output (the largest, when scales are listed largest first)."""
        return self[0]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_default_scales", "scales"):
            raise AttributeError(name)
        if name in PER_SCALE_METHODS:
            def per_scale(*args: Any, **kwargs: Any) -> "ScaleOutputs":
                return ScaleOutputs((getattr(o, name)(*args, **kwargs) for o in self), self.scales)
            return per_scale
        raise AttributeError(
            f"ScaleOutputs has no attribute {name!r}: it holds one output per scale "
            f"{list(self.scales)}, and .{name} would use only one of them. Compute the loss with "
            "sct.SCTLoss(criterion)(outputs, target); for one scale use outputs.primary or "
            "outputs.by_scale()[scale]"
        )

    def _refuse(self, op: str, other: Any) -> Any:
        if isinstance(other, (torch.Tensor, int, float, bool)):
            raise TypeError(
                f"ScaleOutputs {op} {type(other).__name__}: it holds one output per scale "
                f"{list(self.scales)}; apply it per scale (outputs.by_scale()) or to outputs.primary"
            )
        return NotImplemented

    def __eq__(self, other: Any) -> Any:
        if not isinstance(other, tuple):
            self._refuse("==", other)  # raises for tensors and numbers
        return super().__eq__(other)

    def __ne__(self, other: Any) -> Any:
        if not isinstance(other, tuple):
            self._refuse("!=", other)
        return super().__ne__(other)

    __hash__ = tuple.__hash__

    def __mul__(self, other: Any) -> Any:
        return self._refuse("*", other)

    __rmul__ = __mul__

    def __add__(self, other: Any) -> Any:
        if isinstance(other, tuple):
            return tuple(self) + other
        return self._refuse("+", other)

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, tuple):
            return other + tuple(self)
        return self._refuse("+", other)

    def __repr__(self) -> str:
        return f"ScaleOutputs(scales={list(self.scales)}, outputs={tuple.__repr__(self)})"


_SCALED_TYPES: Dict[Tuple[Scale, ...], type] = {}


def scaled_type(scales: Tuple[Scale, ...]) -> type:
    """A ScaleOutputs subclass whose constructor defaults to ``scales`` (same name, cached).

    ``convert`` creates the one for the model's scales; one first needed inside a compiled
    region is not created there (pytree's registry takes a lock dynamo cannot trace).
    """
    if scales not in _SCALED_TYPES:
        if torch.compiler.is_compiling():
            return ScaleOutputs
        sub = type("ScaleOutputs", (ScaleOutputs,), {
            "_default_scales": scales, "__module__": ScaleOutputs.__module__,
            "__qualname__": ScaleOutputs.__qualname__})
        # pytree matches exact types: each subclass flattens like ScaleOutputs
        pytree.register_pytree_node(sub, _flatten, _unflatten,
                                    serialized_type_name=f"sct_convert.ScaleOutputs[{scales!r}]")
        _SCALED_TYPES[scales] = sub
    return _SCALED_TYPES[scales]


def _flatten(outputs: "ScaleOutputs"):
    return list(outputs), outputs.scales


def _unflatten(values: Iterable[Any], scales: Tuple[Scale, ...]) -> "ScaleOutputs":
    return ScaleOutputs(values, scales)


pytree.register_pytree_node(ScaleOutputs, _flatten, _unflatten)


def resize_to(x: torch.Tensor, hw: HW, antialias: bool = True) -> torch.Tensor:
    """Resize images to ``hw`` as SCT's sampling does.

    Args:
        x: a batch ``(..., H, W)``.
        hw: the target ``(height, width)``.
        antialias: antialias when shrinking.

    Returns:
        The bilinear resize (``align_corners=False``) of the last two dims, or ``x`` itself if it
        is already ``hw``.
    """
    if (int(x.shape[-2]), int(x.shape[-1])) == tuple(hw):
        return x
    if x.dim() != 4:
        raise ValueError(
            f"scale sampling resizes 4-d image batches (N, C, H, W), got shape {tuple(x.shape)}; "
            "feed each scale yourself under sct.scale(model, s) with sampling off"
        )
    down = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    out = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False,
                        antialias=antialias and down)
    if x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# Under torch.fx tracing these run as one node each, with eager semantics at run time.
torch.fx.wrap("resize_to")
torch.fx.wrap("fx_publish_route")


def scale_outputs(outputs: Tuple[Any, ...], scales: Tuple[Scale, ...]) -> ScaleOutputs:
    """Build :class:`ScaleOutputs` (an FX leaf, so a traced train-mode graph returns one too)."""
    return ScaleOutputs(outputs, scales)


torch.fx.wrap("scale_outputs")


def image_parameter(forward: Callable) -> Optional[str]:
    """Name of ``forward``'s first parameter after ``self`` (the image), if it has one."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    first = params[0] if params else None
    if first is None or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        return None
    return first.name


def _image(args: tuple, kwargs: Dict[str, Any], name: Optional[str]) -> Optional[torch.Tensor]:
    x = args[0] if args else (kwargs.get(name) if name is not None else None)
    if isinstance(x, torch.fx.Proxy):
        return x  # traced: the size is symbolic, routing goes into the graph
    return x if isinstance(x, torch.Tensor) and x.dim() >= 3 else None


def converted_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The converted model's ``forward``: route by the image's size, or sample every scale."""
    ctx = self.__dict__[CONTEXT_ATTR]
    cls = type(self)
    forward = cls._sct_original_forward
    routes = call_routes()
    route = routes.get(ctx)
    if route is not None and route.pinned:  # called from inside an outer call of this model
        return forward(self, *args, **kwargs)
    index = pinned_index(ctx)  # sct.scale: that branch, no sampling
    if index is None:
        x = _image(args, kwargs, cls._sct_image_parameter)
        if x is None:  # not an image batch: the entry layer routes from what reaches it
            return forward(self, *args, **kwargs)
        if self.training and ctx.sampling:
            return _sampling_forward(self, forward, ctx, x, args, kwargs)
        index = ctx.route_shape(x)
    set_call_routes({**routes, ctx: Route(index, True)})
    try:
        return forward(self, *args, **kwargs)
    finally:
        set_call_routes(routes)


def _sampling_forward(self, forward, ctx, x, args, kwargs) -> ScaleOutputs:
    """SCT's sampling phase: the batch resized to every (sampled) scale, each with its branch."""
    by_keyword = len(args) == 0  # (dynamo cannot trace `not` on a tuple)
    routes = call_routes()
    outputs = []
    indices = ctx.sample_indices()
    for i in indices:
        xi = resize_to(x, ctx.sizes[i], ctx.antialias)
        if isinstance(xi, torch.fx.Proxy):  # the graph tells leaf modules' S-BNs the scale at run time
            xi = fx_publish_route(xi, ctx.fx_key(), i)
        call_args, call_kwargs = ((xi,) + args[1:], kwargs) if not by_keyword else (
            args, {**kwargs, type(self)._sct_image_parameter: xi})
        set_call_routes({**routes, ctx: Route(i, True)})
        try:
            outputs.append(forward(self, *call_args, **call_kwargs))
        except Exception as e:
            # e.g. a train-only aux head too big for a small scale: say which scale it was
            if hasattr(e, "add_note") and isinstance(xi, torch.Tensor):
                e.add_note(f"sct_convert: raised by the train-mode forward at scale {ctx.scales[i]!r} "
                           f"(input {'x'.join(map(str, xi.shape))})")
            raise
        finally:
            set_call_routes(routes)
    return scale_outputs(tuple(outputs), tuple(ctx.scales[i] for i in indices))
