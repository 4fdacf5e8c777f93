"""torchvision detection models: a scale is the size the model's own transform resizes to.

Faster / Mask / Keypoint R-CNN, RetinaNet, FCOS and SSD resize every image inside the model
(``model.transform``, a ``GeneralizedRCNNTransform``) before the backbone: to ``min_size`` (the
shorter side, the longer capped at ``max_size``), or to ``fixed_size`` for SSD. So the image size
a caller passes says nothing about the size the backbone sees, and a detection model's scale is
the transform's size:

- in eval, a call runs the branch of ``transform.min_size`` (``fixed_size`` for SSD), by the
  model's routing policy: ``model.transform.min_size = (224,)`` serves branch 224;
- ``sct.scale(model, 224)`` pins branch 224 *and* makes the transform resize to it (``max_size``
  scaled by the same factor);
- in train mode ``model(images, targets)`` runs once per sampled scale, the transform resizing
  the images (and their boxes, masks, keypoints) to that scale, and returns torchvision's dict
  of losses, each the Eq. 1 mean over the scales (:class:`DetectionLosses`).

The transform reads the size of the call from the call's route (a thread-local set by the
model's forward); nothing is written to the model during a call.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .route import Route, call_with, resolve
from .context import CONTEXT_ATTR, ScaleContext
from .resizer import sized_attributes
from .scales import Scale


class _SizedByRoute:
    """Mixin of the transform's generated subclass: resize to the call's scale when the call's
    route carries one (``sct.scale`` pins and training samples), else as the transform would."""

    def resize(self, image: torch.Tensor, target: Optional[Dict[str, torch.Tensor]] = None) -> Any:
        base = type(self).__mro__[2]  # the transform's own class
        route = resolve(self.__dict__[CONTEXT_ATTR])
        if route is None or route.size is None:
            return base.resize(self, image, target)
        view = copy.copy(self)  # a per-call view: the module itself is never changed
        view.__dict__.update(sized_attributes(self, route.size))
        return base.resize(view, image, target)


_SIZED_CLASSES: Dict[type, type] = {}


def sized_class(cls: type) -> type:
    """The same-named subclass of transform class ``cls`` that resizes to the call's scale (one
    per class, so pickling and ``copy.deepcopy`` rebuild the same type)."""
    if cls not in _SIZED_CLASSES:
        _SIZED_CLASSES[cls] = type(cls.__name__, (_SizedByRoute, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__reduce_ex__": _reduce_sized})
    return _SIZED_CLASSES[cls]


def _reduce_sized(self: nn.Module, protocol: int) -> tuple:
    # The generated class cannot be found by name; rebuild it from the transform's own class.
    return (_new_sized, (type(self).__mro__[2],), self.__dict__)


def _new_sized(cls: type) -> nn.Module:
    sub = sized_class(cls)
    return sub.__new__(sub)


def install_sized_transform(transform: nn.Module, context: ScaleContext) -> None:
    """Give ``transform`` a same-named subclass that resizes to the call's scale."""
    transform.__dict__[CONTEXT_ATTR] = context
    transform.__class__ = sized_class(type(transform))


def remove_sized_transform(transform: nn.Module) -> None:
    cls = type(transform)
    if issubclass(cls, _SizedByRoute):
        transform.__class__ = cls.__mro__[2]
    transform.__dict__.pop(CONTEXT_ATTR, None)


class DetectionLosses(dict):
    """torchvision's dict of losses, each the Eq. 1 weighted sum over the scales of one step.

    ``sum(losses.values())`` is the SCT loss, as torchvision's reference loop computes it.
    ``per_scale`` holds each scale's own dict of (detached) losses, for logging.
    """

    per_scale: Dict[Scale, Dict[str, torch.Tensor]]

    def __init__(self, combined: Dict[str, torch.Tensor], per_scale: Dict[Scale, Dict[str, torch.Tensor]]) -> None:
        super().__init__(combined)
        self.per_scale = per_scale

    def __reduce__(self) -> Any:
        return (DetectionLosses, (dict(self), self.per_scale))


def combine_losses(outputs: Sequence[Dict[str, torch.Tensor]], scales: Sequence[Scale]) -> DetectionLosses:
    """Eq. 1 with alpha_i = 1/M for each loss of torchvision's dict."""
    if not all(isinstance(o, dict) for o in outputs):
        raise TypeError("a detection model in train mode returned no dict of losses: call it as "
                        "torchvision's references do, model(images, targets)")
    weight = 1.0 / len(outputs)
    combined = {k: sum(weight * o[k] for o in outputs) for k in outputs[0]}
    per_scale = {s: {k: v.detach() for k, v in o.items()} for s, o in zip(scales, outputs)}
    return DetectionLosses(combined, per_scale)


def sampling_forward(model: nn.Module, forward: Callable, ctx: ScaleContext,
                     runs: List[Tuple[Scale, Route]], args: tuple, kwargs: Dict[str, Any]) -> DetectionLosses:
    """The train-mode forward of a model that resizes its own input: one call per sampled
    ``(scale, route)``, its transform resizing the images (and targets) to the route's size,
    and torchvision's dict of losses, each the Eq. 1 mean over the scales."""
    outputs = [call_with(ctx, route, forward, model, *args, **kwargs) for _, route in runs]
    return combine_losses(outputs, [s for s, _ in runs])
