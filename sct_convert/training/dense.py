"""Dense targets across scales: a per-pixel target at the input's size, an output at each scale's.

A segmentation model run at a smaller scale predicts a smaller map (or the input's size at that
scale, as torchvision's models upsample to their input), while the label map stays at the size
the data loader produced. :class:`SCTLoss` matches the two before calling the criterion, in one
of two ways (``match=``):

- ``"target"`` (default): the target is resized to the output's (H, W). Integer label maps
  ``(N, H, W)`` use nearest-neighbour exactly as torchvision resizes a mask
  (``transforms.v2.functional.resize`` of a ``tv_tensors.Mask``, what its segmentation reference
  runs on tensors), so labels and ``ignore_index`` values are kept, never blended. Float
  targets ``(N, C, H, W)`` (soft, per-pixel class probabilities) are resized bilinearly with
  antialiasing, which keeps each pixel's probabilities summing to one.
- ``"output"``: every dense output is upsampled bilinearly to the target's (H, W) instead, so the
  loss is always computed at full label resolution.

A target is dense when it has 3 or more dims; an output is dense when it is a floating tensor with
3 or more dims. Class labels ``(N,)``, soft labels ``(N, K)`` and targets that are not tensors (a
detection model's list of dicts) pass through unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

MATCH_MODES = ("target", "output", "none")


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a model output, in order (tensor, mapping, list, tuple, named tuple, dataclass)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name))


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``obj`` rebuilt with ``fn`` applied to every tensor, keeping each container's type."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = obj.copy()  # keeps OrderedDict and dict subclasses
        for key, value in obj.items():
            out[key] = map_tensors(fn, value)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def is_dense_output(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 3


def is_dense_target(target: Any) -> bool:
    return isinstance(target, torch.Tensor) and target.dim() >= 3


def dense_size(output: Any) -> Optional[Tuple[int, int]]:
    """The (H, W) of the first dense tensor of ``output``, or None for a non-dense output."""
    for t in iter_tensors(output):
        if is_dense_output(t):
            return int(t.shape[-2]), int(t.shape[-1])
    return None


def resize_target(target: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``target`` at ``size``: nearest for labels (values kept), antialiased bilinear for floats.

    Args:
        target: ``(N, H, W)`` / ``(N, C, H, W)`` labels or probabilities (any number of leading dims).
        size: the (H, W) to match.

    Returns:
        The target at ``size``, same dtype; unchanged when it is already that size.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    if tuple(target.shape[-2:]) == tuple(size):
        return target
    if not target.is_floating_point():
        return resize(target, list(size), interpolation=InterpolationMode.NEAREST)
    lead = target.shape[:-2]
    flat = target.reshape(1, -1, *target.shape[-2:])
    down = size[0] < target.shape[-2] or size[1] < target.shape[-1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=down)
    return out.reshape(*lead, *size)


def upsample_output(output: Any, size: Tuple[int, int]) -> Any:
    """``output`` with every dense tensor resized bilinearly to ``size`` (containers kept)."""
    def resize(t: torch.Tensor) -> torch.Tensor:
        if not is_dense_output(t) or tuple(t.shape[-2:]) == tuple(size):
            return t
        lead = t.shape[:-3]
        flat = t.reshape(-1, *t.shape[-3:])
        return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, t.shape[-3], *size)

    return map_tensors(resize, output)


def match_dense(output: Any, target: Any, match: str) -> Tuple[Any, Any]:
    """One scale's (output, target) with a dense target and the output at one size (see module doc).

    Args:
        output: the model's output at one scale, as the model returns it.
        target: the target as the data loader gives it.
        match: ``"target"``, ``"output"`` or ``"none"``.

    Returns:
        ``(output, target)``, one of them resized where both are dense and their sizes differ.
    """
    if match == "none" or not is_dense_target(target):
        return output, target
    size = dense_size(output)
    if size is None or size == tuple(target.shape[-2:]):
        return output, target
    if match == "target":
        return output, resize_target(target, size)
    return upsample_output(output, tuple(target.shape[-2:])), target
