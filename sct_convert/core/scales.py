"""Scales as values: parsing, pixel counts, order, text, JSON, branch keys; a model's device.

A scale is an int (a square side, ``224``) or an ``(height, width)`` pair; every rule about
scales that does not depend on a model is written here once, so routing, sampling, export,
the files and the CLI agree on it.
"""
from __future__ import annotations

import json
import operator
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn

Scale = Union[int, Tuple[int, int]]
HW = Tuple[int, int]

#: The infix of a scale-specific layer's branch in ``state_dict`` keys: ``layer1.0.bn1.branches.224.weight``.
BRANCHES = ".branches."


def as_int(v: object) -> Union[int, None]:
    """``v`` as a Python int if it is an integer (``int``, NumPy or 0-d integer tensor), else ``None``.
    ``bool`` is not an integer here."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and (v.dim() != 0 or v.is_floating_point())):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def normalize_scale(scale: object) -> HW:
    """Return ``(h, w)`` for an int or an ``(h, w)`` pair; ``ValueError`` for anything else."""
    side = as_int(scale)
    pair = [as_int(v) for v in scale] if isinstance(scale, (tuple, list)) and len(scale) == 2 else None
    if side is not None:
        hw = (side, side)
    elif pair is not None and None not in pair:
        hw = (pair[0], pair[1])
    else:
        raise ValueError(
            f"invalid scale {scale!r}: a scale is an int (square side, e.g. 224) "
            "or an (height, width) pair of ints, e.g. (128, 96)"
        )
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"invalid scale {scale!r}: sides must be positive")
    return hw


def as_given(scale: object) -> Scale:
    """A scale as users write it: an int for a square given as an int, else an ``(h, w)`` tuple."""
    hw = normalize_scale(scale)
    return hw[0] if as_int(scale) is not None else hw


def scale_of_size(size: Sequence[int]) -> Scale:
    """The scale of an ``(h, w)`` size as users write it: an int when square, else an ``(h, w)`` tuple."""
    h, w = normalize_scale(tuple(size))
    return h if h == w else (h, w)


def short_side(scale: object) -> int:
    """The shorter side of a scale: what a torchvision detector's transform resizes to (``min_size``)."""
    return min(normalize_scale(scale))


def normalize_scales(scales: Iterable[object]) -> Tuple[Tuple[Scale, ...], Tuple[HW, ...]]:
    """Validate a list of scales; return them as given (ints or tuples) and as ``(h, w)`` pairs.

    Empty lists, duplicates (the same size twice, e.g. ``224`` and ``(224, 224)``) and anything
    that is not a scale are a ``ValueError``. The order is kept: it is the branch order.
    """
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
    return tuple(as_given(s) for s in given), tuple(pairs)


def require_largest_first(scales: Sequence[object], option: str = "scales") -> None:
    """``ValueError`` unless ``scales`` are listed largest first by pixel count (equal counts in any
    order): the first scale is the primary one (``ScaleOutputs.primary``, the in-place
    distillation teacher), so an increasing list is more likely a slip than a choice."""
    counts = [pixels(s) for s in scales]
    if any(b > a for a, b in zip(counts, counts[1:])):
        ordered = [scales[i] for i in sorted(range(len(scales)), key=lambda i: (-counts[i], i))]
        shown = ",".join(scale_key(s) for s in ordered) if option.startswith("--") else repr(list(ordered))
        raise ValueError(
            f"{option} must list the scales largest first (by pixel count), the first being the primary "
            f"scale; got {', '.join(scale_key(s) for s in scales)}: pass {option}={shown}")


def pixels(scale: object) -> int:
    """Pixel count of a scale or an ``(h, w)`` size: the measure routing's "nearest" uses."""
    h, w = normalize_scale(scale)
    return h * w


def largest_index(scales: Sequence[object]) -> int:
    """Position of the scale with the most pixels (the first of equals)."""
    return max(range(len(scales)), key=lambda i: (pixels(scales[i]), -i))


def smallest_index(scales: Sequence[object]) -> int:
    """Position of the scale with the fewest pixels (the first of equals)."""
    return min(range(len(scales)), key=lambda i: (pixels(scales[i]), i))


def by_pixels(scales: Sequence[object]) -> List[HW]:
    """The scales as ``(h, w)``, fewest pixels first."""
    return sorted((normalize_scale(s) for s in scales), key=lambda hw: hw[0] * hw[1])


def scale_key(scale: object) -> str:
    """A scale as text: its branch name in ``state_dict`` keys and file names, ``224`` or ``128x96``."""
    h, w = normalize_scale(scale)
    return str(h) if h == w else f"{h}x{w}"


def parse_key(text: str) -> Scale:
    """Inverse of :func:`scale_key`: ``"224"`` -> 224, ``"128x96"`` -> (128, 96)."""
    parts = text.strip().lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ScaleSyntaxError(f"invalid scale {text!r}: write a side (224) or HxW (128x96)")
    values = [int(p) for p in parts]
    return as_given(values[0] if len(values) == 1 else tuple(values))


class ScaleSyntaxError(ValueError):
    """Text that is not a scale at all (as opposed to a scale that is not allowed, e.g. 0)."""


def scales_to_json(scales: Sequence[object]) -> str:
    """Scales as JSON for file metadata: ``[224, [128, 96]]``."""
    return json.dumps([list(s) if isinstance(s, tuple) else s for s in (as_given(s) for s in scales)])


def scales_from_json(text: str) -> List[Scale]:
    """Inverse of :func:`scales_to_json`."""
    return [tuple(s) if isinstance(s, list) else s for s in json.loads(text)]


def branch_key(layer: str, key: str, rest: str) -> str:
    """The ``state_dict`` key of tensor ``rest`` of branch ``key`` in S-BN layer ``layer``."""
    return f"{layer}{BRANCHES}{key}.{rest}"


def split_branch_key(name: str) -> Union[Tuple[str, str, str], None]:
    """``(layer, branch key, rest)`` of a branch tensor's ``state_dict`` key; ``None`` for other keys."""
    if BRANCHES not in name:
        return None
    layer, _, tail = name.partition(BRANCHES)
    key, _, rest = tail.partition(".")
    return layer, key, rest


def is_branched(state: Dict[str, Any]) -> bool:
    """Whether a state dict is a converted model's (it has branch keys)."""
    return any(BRANCHES in k for k in state)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives; the CPU for a model with neither."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter: what its inputs should be."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32
