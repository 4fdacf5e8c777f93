"""Models that resize their own input: which module does it, and to what size.

torchvision's detection models (Faster / Mask / Keypoint R-CNN, RetinaNet, FCOS, SSD) resize
every image inside the model (``model.transform``, a ``GeneralizedRCNNTransform``) before the
backbone, to ``min_size`` (the shorter side, the longer capped at ``max_size``) or to
``fixed_size`` for SSD. For such a model a scale is the transform's size, not the caller's
image size. This module reads and writes those sizes; :mod:`sct_convert.core.detector_forward` builds the
training and the per-call resize on it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from .scales import HW, short_side


def _transform_type() -> Optional[type]:
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    return GeneralizedRCNNTransform


def find_resizer(model: nn.Module) -> str:
    """Qualified name of the module that resizes the model's input (a torchvision detection
    transform), or ``""`` when the model has none."""
    cls = _transform_type()
    if cls is None:
        return ""
    for name, module in model.named_modules():
        if isinstance(module, cls):
            return name
    return ""


def transform_size(transform: nn.Module) -> HW:
    """The (H, W) a detection transform resizes to: ``fixed_size``, else ``min_size`` square."""
    fixed = getattr(transform, "fixed_size", None)
    if fixed:
        return int(fixed[0]), int(fixed[1])
    side = int(transform.min_size[-1])
    return side, side


def sized_attributes(transform: nn.Module, hw: HW) -> Dict[str, Any]:
    """The transform's size attributes for scale ``hw``: ``min_size`` (``max_size`` scaled alike)
    or ``fixed_size``."""
    if getattr(transform, "fixed_size", None):
        return {"fixed_size": (hw[0], hw[1])}
    own, side = int(transform.min_size[-1]), short_side(hw)
    return {"min_size": (side,), "max_size": int(round(transform.max_size * side / own))}

