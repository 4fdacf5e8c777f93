"""What ``torch.jit.script`` compiles for a converted model.

TorchScript cannot read the per-call route (a Python thread-local), so a scripted model is
built differently: one plain view of the model per scale, routed by input size inside the
scripted ``forward``. (No ``from __future__ import annotations`` here: TorchScript reads the
annotations.)
"""
from typing import List, Sequence, Tuple

import torch
from torch import nn

from .rule import script_choose


class ScriptedRouter(nn.Module):
    """What ``torch.jit.script`` compiles for a converted model: one view per scale, routed.

    Each view is the original architecture with that scale's BN branch; views share every
    parameter and buffer with the eager model (no copies of the weights). ``forward`` picks
    the view from the input's (H, W) per call (exact, else nearest by pixel count, or an error
    under ``unknown_scale="error"``), so a scripted model is as thread-safe as the eager one.
    No sampling and no ``sct.scale`` in TorchScript: script ``sct.extract(model, s)`` for a
    fixed scale.
    """

    sizes: List[List[int]]

    def __init__(self, views: List[nn.Module], sizes: Sequence[Tuple[int, int]], unknown_error: bool) -> None:
        super().__init__()
        self.views = nn.ModuleList(views)
        self.sizes = [list(hw) for hw in sizes]
        self.unknown_error = unknown_error

    def forward(self, x: torch.Tensor):
        # (no return annotation: the views' own output type, tuples and named tuples included)
        index = script_choose(x.shape[-2], x.shape[-1], self.sizes, not self.unknown_error)
        if index < 0:
            raise ValueError("sct_convert: input size matches none of the model's scales "
                             "and unknown_scale='error'")
        for i, view in enumerate(self.views):
            if i == index:
                return view(x)
        raise RuntimeError("sct_convert: no view for the routed scale")
