"""What a converted model is: its generated class, and the questions a user asks of it.

``convert`` swaps the model's class for a generated subclass of the same name (the way
``torch.nn.utils.parametrize`` does) whose ``forward`` routes each call by the image's size or
samples every scale in train mode. This module owns that class (one per original class, so
pickling, ``copy.deepcopy`` and ``nn.DataParallel`` replicas rebuild the same type), what
TorchScript scripts in its place, and the queries on a converted model: its context, scales,
route for a size, S-BN layers, the ``scale`` override and the plain copy of one scale.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple, Type, Union

import torch
from torch import nn

from .batchnorm import ScaleSpecificBatchNorm
from .route import EntryRouter, SAMPLE, pin_of, pinned, resolve, routed_forward, scale_route
from .context import CONTEXT_ATTR, ScaleContext
from .scales import HW, Scale, normalize_scale, scale_key
from . import detector_forward as detection
from . import sampling
from .detector_forward import remove_sized_transform
from .resizer import sized_attributes, transform_size
from ..errors import ConversionError
from .rule import ScaleBlend, find_image, route_size
from .sampling import image_parameter, scaled_type
from .scripting import ScriptedRouter

_CONVERTED_CLASSES: Dict[type, type] = {}


def converted_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The converted model's ``forward``: the call's route (:func:`call_route.resolve`), then the
    model's own forward under it, or, in train mode, once per sampled scale."""
    ctx = self.__dict__[CONTEXT_ATTR]
    cls = type(self)
    forward = cls._sct_original_forward
    resizer = self.get_submodule(ctx.resizer) if ctx.resizer else None
    image = None if resizer is not None else find_image(args, kwargs, cls._sct_image_parameter)
    route = resolve(ctx, image=image, resizer=resizer, sampling=self.training and ctx.sampling)
    if route is SAMPLE and resizer is not None:
        return detection.sampling_forward(self, forward, ctx, sampling.scale_runs(ctx, between=ctx.sample_between),
                                          args, kwargs)
    if route is SAMPLE:
        return sampling.sampling_forward(self, forward, ctx, args, kwargs)
    return routed_forward(self, forward, ctx, route, args, kwargs)


def converted_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """The subclass of ``cls`` a converted model has: same name, ``forward`` routes and samples.

    One class per original class, so pickling, ``copy.deepcopy`` and ``nn.DataParallel``
    replicas rebuild the same type. ``forward`` keeps the original's signature
    (``inspect.signature``, ``torch.export``'s ``dynamic_shapes`` matching).
    """
    if cls not in _CONVERTED_CLASSES:
        original = cls.forward

        @functools.wraps(original)
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return converted_forward(self, *args, **kwargs)

        _CONVERTED_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": forward,
            "__prepare_scriptable__": _scriptable_router,
            "__reduce_ex__": _reduce_converted,
            "_sct_original_class": cls,
            "_sct_original_forward": original,
            "_sct_image_parameter": image_parameter(original),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        })
    return _CONVERTED_CLASSES[cls]


def original_class(model: nn.Module) -> Type[nn.Module]:
    """The class ``model`` had before :func:`convert`.

    Args:
        model: a converted model.

    Returns:
        The original class (``convert`` swaps in a generated subclass of the same name).
    """
    return getattr(type(model), "_sct_original_class", type(model))


def _reduce_converted(self: nn.Module, protocol: int) -> tuple:
    # The generated class cannot be found by name; rebuild it from the original class.
    return (_new_converted, (self._sct_original_class,), self.__dict__)


def _new_converted(cls: Type[nn.Module]) -> nn.Module:
    sub = converted_class(cls)
    return sub.__new__(sub)


def install(model: nn.Module, context: ScaleContext) -> None:
    """Attach ``context`` to ``model`` and swap in its converted class: the last step of ``convert``."""
    setattr(model, CONTEXT_ATTR, context)
    model.__class__ = converted_class(type(model))
    scaled_type(tuple(context.scales))  # the train-mode output's type, made outside any compile


def _scriptable_router(model: nn.Module) -> nn.Module:
    ctx = context_of(model)
    if ctx.resizer:
        return _scriptable_detector(model, ctx)
    if ctx.unknown_scale == "interpolate":
        raise ConversionError(
            "a model converted with unknown_scale='interpolate' cannot be scripted: TorchScript "
            "routes to one branch per call; export it with sct.export_program (which blends), or "
            "script a model converted with unknown_scale='nearest'")
    views = [_plain_copy(model, s, share_tensors=True) for s in ctx.scales]
    return ScriptedRouter(views, ctx.sizes, ctx.unknown_scale == "error").train(model.training)


def _scriptable_detector(model: nn.Module, ctx: ScaleContext) -> nn.Module:
    """A detector scripts as the plain detector its transform's size (or an ``sct.scale`` pin)
    serves now, eager's route, sharing the model's tensors: TorchScript cannot read the per-call route, so a scripted
    detector holds one branch; each scale scripts from ``sct.extract(model, s)``."""
    pin = pin_of(ctx)  # inside sct.scale: that branch, resizing to its scale
    size = pin.size if pin is not None else transform_size(model.get_submodule(ctx.resizer))
    chosen = pin.branch if pin is not None else route_size(ctx, size, warn=False)
    if not isinstance(chosen, int):
        raise ConversionError(
            f"the detector's transform resizes to {scale_key(size)}, between two scales, and "
            "unknown_scale='interpolate' blends them, which a scripted model cannot; set the transform "
            "to a trained scale (or use sct.scale) before scripting, or script sct.extract(model, s)")
    warnings.warn(
        f"sct_convert: a scripted detector serves one branch: {scale_key(ctx.sizes[chosen])}, the one its "
        f"transform's size ({scale_key(size)}) runs; script sct.extract(model, s) for each other scale",
        UserWarning, stacklevel=3)
    return _plain_copy(model, ctx.scales[chosen], share_tensors=True, transform_at=size)


# ---------------------------------------------------------------------------------------------
# Queries and the scale override


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel / ``torch.compile`` wrapper (itself otherwise)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and isinstance(getattr(inner, CONTEXT_ATTR, None), ScaleContext):
            return inner
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside its DDP / DataParallel / compile wrapper) is converted."""
    return isinstance(getattr(unwrap(model), CONTEXT_ATTR, None), ScaleContext)


def context_of(model: nn.Module) -> ScaleContext:
    """The :class:`ScaleContext` of a converted model: its scales, sizes and routing policy.

    Args:
        model: a converted model, or one wrapped in DDP, DataParallel or ``torch.compile``.

    Returns:
        The context shared by the model's S-BN layers. Raises ``ValueError`` if ``model`` is not
        converted.
    """
    ctx = getattr(unwrap(model), CONTEXT_ATTR, None)
    if isinstance(ctx, ScaleContext):
        return ctx
    raise ValueError(
        f"{type(model).__name__} is not a converted model; call sct.convert(model, scales) first"
    )


def scales_of(model: nn.Module) -> Tuple[Scale, ...]:
    """The model's scales, in the order given to :func:`convert`.

    Args:
        model: a converted model.

    Returns:
        A tuple of ints and ``(height, width)`` pairs.
    """
    return context_of(model).scales


def route(model: nn.Module, size: Any) -> Union[Scale, ScaleBlend]:
    """The scale whose branch serves an input of ``size``, by the model's routing policy.

    Args:
        model: a converted model.
        size: an image batch (its last two dims are read), an ``(h, w)`` pair or an int side.

    Returns:
        One of ``scales_of(model)``; under ``unknown_scale="interpolate"``, for a size strictly
        between two scales (by pixel count), a :class:`ScaleBlend` ``(low, high, t)``: the two
        scales whose BN tensors are blended, ``lerp(low, high, t)``. Raises ``ValueError`` for an
        untrained size under ``unknown_scale="error"``. It never warns: it answers the question
        (a forward at an untrained size warns once under ``"nearest"``).
    """
    ctx = context_of(model)
    hw = (int(size.shape[-2]), int(size.shape[-1])) if isinstance(size, torch.Tensor) else normalize_scale(size)
    chosen = route_size(ctx, hw, warn=False)
    if isinstance(chosen, int):
        return ctx.scales[chosen]
    return ScaleBlend(ctx.scales[chosen.low], ctx.scales[chosen.high], chosen.t)


def scale_specific_layers(model: nn.Module) -> Iterator[Tuple[str, ScaleSpecificBatchNorm]]:
    """Every S-BN layer of a converted model, in module order.

    Args:
        model: a converted model.

    Returns:
        An iterator of ``(qualified name, ScaleSpecificBatchNorm)``.
    """
    for name, m in model.named_modules():
        if isinstance(m, ScaleSpecificBatchNorm):
            yield name, m


@contextlib.contextmanager
def scale(model: nn.Module, s: Scale) -> Iterator[nn.Module]:
    """Run every forward of ``model`` inside the block with branch ``s``, whatever the input size.

    The override holds for calls made from this thread (and asyncio task) only, so other
    threads serving the same model keep routing by size; it ends with the block. Train-mode
    calls inside it run that one scale (no sampling).

    Args:
        model: a converted model.
        s: one of its scales.

    Returns:
        A context manager yielding ``model``.
    """
    ctx = context_of(model)
    with pinned(ctx, scale_route(ctx, ctx.index(s))):
        yield model


def _plain_copy(model: nn.Module, s: Scale, share_tensors: bool = False,
                transform_at: Optional[HW] = None) -> nn.Module:
    """The original architecture with branch ``s`` in place of every S-BN; ``model`` untouched.
    A detector's copy resizes to ``s`` (to ``transform_at`` when given)."""
    inner = unwrap(model)
    ctx = context_of(inner)
    key = scale_key(ctx.sizes[ctx.index(s)])
    memo: Dict[int, Any] = {id(ctx): ctx}
    if share_tensors:
        for t in list(inner.parameters()) + list(inner.buffers()):
            memo[id(t)] = t
    for _, sbn in scale_specific_layers(inner):
        memo[id(sbn)] = copy.deepcopy(sbn.branches[key], memo)
    plain = copy.deepcopy(inner, memo)
    plain.__class__ = original_class(inner)
    vars(plain).pop(CONTEXT_ATTR, None)
    if ctx.resizer:  # a detection model's copy resizes to its scale
        transform = plain.get_submodule(ctx.resizer)
        remove_sized_transform(transform)
        transform.__dict__.update(sized_attributes(transform, transform_at or ctx.sizes[ctx.index(s)]))
    for m in plain.modules():
        for hook_id, hook in list(m._forward_pre_hooks.items()):
            if isinstance(hook, EntryRouter):
                del m._forward_pre_hooks[hook_id]
    return plain


def extract(model: nn.Module, s: Scale) -> nn.Module:
    """A copy of the original architecture (original classes, no S-BN) with branch ``s``'s state.

    Args:
        model: a converted model (or a DDP / DataParallel wrapper of one); left unchanged.
        s: one of its scales.

    Returns:
        A new module of the model's original class whose ``state_dict`` has exactly the
        original keys; in eval mode it computes what the converted model computes at ``s``.
    """
    return _plain_copy(model, s)
