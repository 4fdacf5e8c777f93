"""SCT's scale-sampling phase: a train-mode forward runs the batch once per training scale.

``convert`` installs :func:`sampling_forward` as the model's instance ``forward``; it calls the
model's own class ``forward`` once per scale, on the batch resized to that scale and with that
scale's branch, and returns :class:`ScaleOutputs`. Eval mode, sampling switched off, or a
branch forced with ``sct.scale`` run the model's own forward unchanged.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .context import CONTEXT_ATTR, HW, Scale


class ScaleOutputs(tuple):
    """The model's outputs, one per sampled scale, in the model's scale order.

    ``.scales`` names them. Attribute access the tuple does not have (``.argmax``, ``.topk``,
    ``.shape``) goes to the first scale's output, so logging code written for one logits
    tensor keeps working; losses should go through :class:`sct_convert.SCTLoss`.
    """

    scales: Tuple[Scale, ...]

    def __new__(cls, outputs: Iterable[Any], scales: Sequence[Scale]) -> "ScaleOutputs":
        obj = super().__new__(cls, tuple(outputs))
        obj.scales = tuple(scales)
        if len(obj.scales) != len(obj):
            raise ValueError(f"{len(obj)} outputs for {len(obj.scales)} scales")
        return obj

    def __getnewargs__(self):
        return (tuple(self), self.scales)

    def by_scale(self) -> Dict[Scale, Any]:
        return dict(zip(self.scales, self))

    @property
    def primary(self) -> Any:
        return self[0]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self[0], name)

    def __repr__(self) -> str:
        return f"ScaleOutputs(scales={list(self.scales)}, outputs={tuple.__repr__(self)})"


pytree.register_pytree_node(
    ScaleOutputs,
    lambda o: (list(o), o.scales),
    lambda values, scales: ScaleOutputs(values, scales),
)


def resize_to(x: torch.Tensor, hw: HW, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of the last two dims; ``x`` itself if already ``hw``."""
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


def sampling_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The converted model's ``forward``: SCT's scale sampling in train mode, else unchanged."""
    ctx = getattr(self, CONTEXT_ATTR)
    forward = type(self).forward
    x = args[0] if args else None
    if not (self.training and ctx.sampling and ctx.forced is None and isinstance(x, torch.Tensor)):
        return forward(self, *args, **kwargs)
    indices = ctx.sample_indices()
    outputs = []
    for i in indices:
        ctx.forced = i  # the branch of scale i, whatever size the entry layer sees
        xi = resize_to(x, ctx.sizes[i], ctx.antialias)
        try:
            outputs.append(forward(self, xi, *args[1:], **kwargs))
        except Exception as e:
            # e.g. a train-only aux head too big for a small scale: say which scale it was
            if hasattr(e, "add_note"):
                e.add_note(f"sct_convert: raised by the train-mode forward at scale {ctx.scales[i]!r} "
                           f"(input {'x'.join(map(str, xi.shape))})")
            raise
        finally:
            ctx.forced = None
    return ScaleOutputs(outputs, [ctx.scales[i] for i in indices])
