"""Scale state shared by one converted model: its scales, the active branch and routing.

A :class:`ScaleContext` is a plain object (not a module, so it never enters ``state_dict``).
The converted model, every S-BN layer and the entry hook hold the same instance; a
``copy.deepcopy`` of the model (EMA, model soups) copies it once and keeps that sharing.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

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


class ScaleContext:
    """Which branch every S-BN of one model uses right now, and how input sizes pick it.

    Routing happens at the model's entry layer: normally the first S-BN in execution order,
    else (when that layer cannot tell the scales apart) a hook on the first layer that can.
    ``entry_sizes[i]`` is the spatial size the entry layer sees when the image is at scale
    ``i``; conversion measures it, so strided stems and space-to-depth route correctly, and
    "nearest by pixel count" compares sizes at that layer.
    """

    def __init__(self, scales: Sequence[object], unknown_scale: str = "nearest") -> None:
        if unknown_scale not in ROUTING_POLICIES:
            raise ValueError(
                f"unknown_scale={unknown_scale!r}: choose one of {', '.join(ROUTING_POLICIES)}"
            )
        self.scales, self.sizes = normalize_scales(scales)
        self.unknown_scale = unknown_scale
        self.entry_sizes: List[HW] = list(self.sizes)
        self.active = 0
        self.active_key = self.keys[0]  # read by every S-BN call, so kept precomputed
        self.forced: Optional[int] = None
        self.sampling = True  # train-mode forward runs every scale (SCT's sampling phase)
        self.antialias = True  # antialias when sampling resizes down
        self.sample_subset: Optional[List[int]] = None  # indices; None: every scale
        self.script_state = torch.zeros(1, dtype=torch.long)  # active index for TorchScript
        self.scale_specific_bn = True  # False: shared norm layers, sampling only
        self._warned: set = set()

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(scale_key(hw) for hw in self.sizes)

    def sample_indices(self) -> List[int]:
        """Scales a sampling forward runs, in the model's scale order."""
        return list(self.sample_subset) if self.sample_subset is not None else list(range(len(self.sizes)))

    def select(self, index: int) -> None:
        """Make branch ``index`` the one every S-BN layer runs."""
        self.active = index
        self.active_key = scale_key(self.sizes[index])

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

    def route(self, entry_hw: HW) -> int:
        """Branch index for an entry tensor of spatial size ``entry_hw`` (exact, then nearest)."""
        for i, hw in enumerate(self.entry_sizes):
            if hw == entry_hw:
                return i
        if self.unknown_scale == "error":
            raise ValueError(
                f"input size {entry_hw} matches none of the model's scales {list(self.scales)} "
                "and unknown_scale='error'; resize the input, force a branch with "
                "sct.scale(model, s), or convert with unknown_scale='nearest'"
            )
        pixels = entry_hw[0] * entry_hw[1]
        best = min(
            range(len(self.entry_sizes)),
            key=lambda i: abs(pixels - self.entry_sizes[i][0] * self.entry_sizes[i][1]),
        )
        if entry_hw not in self._warned:
            self._warned.add(entry_hw)
            warnings.warn(
                f"sct_convert: input size {entry_hw} is not a trained scale; using the nearest "
                f"branch {self.scales[best]!r} (by pixel count). Pass unknown_scale='error' to "
                "refuse such inputs.",
                stacklevel=3,
            )
        return best

    def route_input(self, x: object) -> None:
        """Select the branch for the tensor reaching the entry layer (or the forced branch)."""
        if self.forced is not None:
            self.select(self.forced)
        elif isinstance(x, torch.Tensor) and x.dim() >= 3:
            self.select(self.route((int(x.shape[-2]), int(x.shape[-1]))))

    def entry_hook(self, module: torch.nn.Module, args: tuple) -> None:
        """Forward pre-hook for an entry layer that is not itself an S-BN."""
        self.route_input(args[0] if args else None)

    def __repr__(self) -> str:
        return (
            f"ScaleContext(scales={list(self.scales)}, active={self.scales[self.active]!r}, "
            f"unknown_scale={self.unknown_scale!r})"
        )
