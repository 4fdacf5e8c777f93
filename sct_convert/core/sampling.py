"""SCT's scale-sampling phase: the batch at every scale, and the outputs it gives (ScaleOutputs).

In train mode a converted model's forward (see :mod:`sct_convert.core.model`) calls the model's
own ``forward`` once per scale, on the batch resized to that scale under that scale's route
(:mod:`sct_convert.core.route`), and returns :class:`ScaleOutputs`. The per-scale loop that
sampling, ``train_step`` and ``calibrate`` share is :func:`scale_runs`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .route import Route, call_with, pin_in_graph
from .context import ScaleContext
from .scales import HW, Scale, by_pixels, normalize_scale, scale_of_size
from .rule import choose, find_image


#: Tensor methods that act on each output alike: on ScaleOutputs they apply to every scale.
PER_SCALE_METHODS = frozenset({
    "to", "cpu", "cuda", "float", "half", "double", "bfloat16", "detach", "clone", "contiguous",
    "requires_grad_", "argmax", "softmax", "log_softmax", "sigmoid", "view", "reshape",
    "flatten", "squeeze", "unsqueeze", "type_as", "to_dense",
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

    def __init__(self, outputs: Iterable[Any], scales: Optional[Sequence[Scale]] = None) -> None:
        super().__init__()  # the tuple is built in __new__; this states the signature

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

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        """``torch.cat`` of a sequence holding ScaleOutputs concatenates every scale's output
        (what a train-mode FX feature extractor's output dict gives, as timm's tests use it);
        any other torch function refuses, as a tensor operation on the outputs would drop scales."""
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat, torch.concatenate) and args and isinstance(args[0], (list, tuple)):
            flat = [t for v in args[0] for t in (v if isinstance(v, ScaleOutputs) else (v,))]
            return func(flat, *args[1:], **kwargs)
        raise TypeError(
            f"{getattr(func, '__name__', func)} got ScaleOutputs: it holds one output per scale; "
            "compute the loss with sct.SCTLoss(criterion)(outputs, target), or use outputs.primary "
            "or outputs.by_scale()[scale] for one scale")

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


def _flatten(outputs: "ScaleOutputs") -> Tuple[List[Any], Tuple[Scale, ...]]:
    return list(outputs), outputs.scales


def _unflatten(values: Iterable[Any], scales: Tuple[Scale, ...]) -> "ScaleOutputs":
    return ScaleOutputs(values, scales)


pytree.register_pytree_node(ScaleOutputs, _flatten, _unflatten)


def resize_to(x: torch.Tensor, hw: HW, antialias: bool = True) -> torch.Tensor:
    """Resize images to ``hw`` as SCT's sampling does.

    Args:
        x: an image ``(C, H, W)``, a batch ``(N, C, H, W)`` or a clip batch ``(N, C, T, H, W)``
            (every frame is resized; the frames are kept).
        hw: the target ``(height, width)``.
        antialias: antialias when shrinking.

    Returns:
        The bilinear resize (``align_corners=False``) of the last two dims, or ``x`` itself if it
        is already ``hw``.
    """
    if (int(x.shape[-2]), int(x.shape[-1])) == tuple(hw):
        return x
    if x.dim() not in (3, 4, 5):
        raise ValueError(
            "scale sampling resizes images (C, H, W), batches (N, C, H, W) and clips "
            f"(N, C, T, H, W), got shape {tuple(x.shape)}; feed each scale yourself under "
            "sct.scale(model, s) with sampling off"
        )
    down = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    if x.dim() == 5:  # frames as a batch of images: (N, C, T, H, W) -> (N*T, C, H, W)
        n, c, t = x.shape[:3]
        frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, *x.shape[-2:])
        out = F.interpolate(frames, size=tuple(hw), mode="bilinear", align_corners=False,
                            antialias=antialias and down)
        return out.reshape(n, t, c, *hw).permute(0, 2, 1, 3, 4)
    image = x.dim() == 3
    out = F.interpolate(x.unsqueeze(0) if image else x, size=tuple(hw), mode="bilinear",
                        align_corners=False, antialias=antialias and down)
    if image:
        return out.squeeze(0)
    if x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# Under torch.fx tracing these run as one node each, with eager semantics at run time.
torch.fx.wrap("resize_to")


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


def resize_inputs(args: tuple, kwargs: Dict[str, Any], name: Optional[str], hw: HW,
                  antialias: bool) -> Tuple[tuple, Dict[str, Any]]:
    """The call's inputs with its image input resized to ``hw``: the first positional input (or
    keyword ``name``), a tensor, each tensor of a list / tuple, or each image-like dict value."""
    def resize(v: Any) -> Any:
        if isinstance(v, torch.fx.Proxy) or (isinstance(v, torch.Tensor) and v.dim() >= 3):
            return resize_to(v, hw, antialias)
        if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
            return type(v)(resize(e) for e in v)
        if isinstance(v, dict):
            return type(v)((k, resize(e)) for k, e in v.items())
        return v

    if args:
        return (resize(args[0]),) + args[1:], kwargs
    return args, {**kwargs, name: resize(kwargs[name])}


def between_size(ctx: ScaleContext) -> Optional[Tuple[Scale, Any]]:
    """One random size strictly between the smallest and the largest scale (none of the trained
    ones), and its route under the model's policy (``"error"`` routes it to the nearest): the
    extra size of ``set_sampling(model, between=True)``. Drawn from torch's global RNG."""
    ordered = by_pixels(ctx.sizes)
    (h0, w0), (h1, w1) = ordered[0], ordered[-1]
    steps = max(abs(h1 - h0), abs(w1 - w0))
    candidates = []
    for k in range(1, steps):
        hw = (round(h0 + (h1 - h0) * k / steps), round(w0 + (w1 - w0) * k / steps))
        if hw not in ctx.sizes and hw not in candidates:
            candidates.append(hw)
    if not candidates:
        return None
    hw = candidates[int(torch.randint(len(candidates), ()))]
    policy = "nearest" if ctx.unknown_scale == "error" else ctx.unknown_scale
    return scale_of_size(hw), choose(hw, ctx.sizes, policy)


def scale_runs(ctx: ScaleContext, indices: Optional[Sequence[int]] = None,
               between: bool = False) -> List[Tuple[Scale, Route]]:
    """The per-scale loop of sampling, ``train_step`` and ``calibrate``, written once:
    ``(scale, route)`` for each scale in ``indices`` (default: those the model samples), then,
    with ``between``, one random size between the scales (:func:`between_size`). Each route
    carries its branch and the size the run is at, which is the size a model that resizes its
    own input (a detection transform) resizes to."""
    indices = ctx.sample_indices() if indices is None else indices
    runs = [(ctx.scales[i], Route(i, ctx.sizes[i])) for i in indices]
    extra = between_size(ctx) if between else None
    if extra is not None:
        s, branch = extra
        runs.append((s, Route(branch, normalize_scale(s))))
    return runs


def sampling_forward(model: torch.nn.Module, forward: Callable, ctx: ScaleContext, args: tuple,
                     kwargs: Dict[str, Any]) -> ScaleOutputs:
    """SCT's sampling phase: the batch resized to every (sampled) scale, each run under its route."""
    name = type(model)._sct_image_parameter
    outputs, scales = [], []
    for s, route in scale_runs(ctx, between=ctx.sample_between):
        call_args, call_kwargs = resize_inputs(args, kwargs, name, route.size, ctx.antialias)
        x = find_image(call_args, call_kwargs, name)
        if isinstance(x, torch.fx.Proxy) and isinstance(route.branch, int):
            # the graph tells leaf modules' S-BNs the scale at run time, before they run
            x = pin_in_graph(ctx, x, route.branch)
            call_args, call_kwargs = ((x,) + call_args[1:], call_kwargs) if call_args else (
                call_args, {**call_kwargs, name: x})
        try:
            outputs.append(call_with(ctx, route, forward, model, *call_args, **call_kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised as it is, with a note naming the scale
            # e.g. a train-only aux head too big for a small scale: say which scale it was
            if hasattr(e, "add_note") and isinstance(x, torch.Tensor):
                e.add_note(f"sct_convert: raised by the train-mode forward at scale {s!r} "
                           f"(input {'x'.join(map(str, x.shape))})")
            raise
        scales.append(s)
    return scale_outputs(tuple(outputs), tuple(scales))
