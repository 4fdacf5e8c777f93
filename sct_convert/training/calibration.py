"""Per-scale BN calibration without training, and adding or removing a scale later.

``calibrate`` re-estimates every branch's running statistics from unlabeled batches resized to
that branch's scale: the branch normalizes with batch statistics (as in training) and its
running statistics become the exact cumulative average over the batches (``momentum=None``),
with no gradient, no weight touched and no other branch changed.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.batchnorm import FROZEN_BATCH_NORM_TYPES, blended_state
from ..core.route import pinned
from ..core.context import ScaleContext
from ..core.scales import HW, Scale, normalize_scale, scale_key, model_device
from ..core.model import context_of, scale, scale_specific_layers, unwrap
from ..conversion.probe import SizeLog, rng_kept, run_at_every_scale, training_failure
from .._utils.batches import images_of
from .._utils.modes import run_mode
from .._utils.progress import Steps
from ..core.rule import bracket, nearest_index
from ..core.sampling import resize_to, scale_runs

class _FrozenAsBatchNorm(nn.Module):
    """Stand-in that lets a frozen BN branch collect statistics like a training BN."""

    def __init__(self, frozen: nn.Module) -> None:
        super().__init__()
        self.frozen = frozen
        c = frozen.weight.shape[0]
        self.bn = nn.BatchNorm2d(c, eps=getattr(frozen, "eps", 1e-5), momentum=None)
        self.bn.to(frozen.weight.device)
        with torch.no_grad():
            self.bn.weight.copy_(frozen.weight)
            self.bn.bias.copy_(frozen.bias)
        self.rest = [m for name, m in frozen.named_children() if name in ("drop", "act")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        for m in self.rest:
            x = m(x)
        return x

    def write_back(self) -> None:
        with torch.no_grad():
            self.frozen.running_mean.copy_(self.bn.running_mean)
            self.frozen.running_var.copy_(self.bn.running_var)


@contextlib.contextmanager
def _collecting(model: nn.Module, key: str) -> Iterator[List[_BatchNorm]]:
    """Model in eval, branch ``key`` of every S-BN collecting fresh cumulative statistics."""
    saved, stand_ins, collected = [], [], []
    with run_mode(model):  # eval inside; every module's flag as it was after
        try:
            for _, layer in scale_specific_layers(model):
                branch = layer.branches[key]
                if isinstance(branch, FROZEN_BATCH_NORM_TYPES):
                    stand_in = _FrozenAsBatchNorm(branch).train()
                    layer.branches[key] = stand_in
                    stand_ins.append((layer, stand_in))
                    collected.append(stand_in.bn)
                elif isinstance(branch, _BatchNorm) and branch.running_mean is not None:
                    # (track_running_stats=False keeps no statistics: nothing to calibrate)
                    saved.append((branch, branch.momentum, branch.track_running_stats))
                    branch.momentum = None  # cumulative average: 1 / num_batches_tracked
                    branch.track_running_stats = True
                    branch.reset_running_stats()
                    branch.train()
                    collected.append(branch)
            yield collected
            for _, stand_in in stand_ins:
                stand_in.write_back()
        finally:
            for layer, stand_in in stand_ins:
                layer.branches[key] = stand_in.frozen
            for branch, momentum, track in saved:
                branch.momentum, branch.track_running_stats = momentum, track


def _reduce_across_ranks(bns: Sequence[_BatchNorm]) -> None:
    """Average statistics over DDP ranks (equal batch counts per rank make the mean exact)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for bn in bns:
        for t in (bn.running_mean, bn.running_var):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int = 100,
    scales: Optional[Sequence[Scale]] = None,
    progress: bool = True,
) -> nn.Module:
    """Re-estimate the BN statistics of each scale's branch from up to ``num_batches`` batches.

    ``data`` yields tensors, ``(images, ...)`` tuples or dicts with an image key; batches are
    resized to each scale as training would. Under DDP every rank must call it with its own
    shard and the same ``num_batches``: statistics are averaged across ranks. Layers that keep
    no running statistics are skipped; a ``data`` with fewer batches than asked is used whole,
    with a warning.

    Args:
        model: a converted model; its branches' running statistics are replaced in place.
        data: an iterable of batches, e.g. a ``DataLoader`` (labels are ignored).
        num_batches: batches to use per scale, at most.
        scales: the scales to calibrate (default: every scale).
        progress: report each scale: a bar on a terminal, one line on stderr otherwise.

    Returns:
        ``model``, with every module's train/eval state as it was.
    """
    ctx = context_of(model)
    if not ctx.scale_specific_bn:
        raise ValueError("model was converted with scale_specific_bn=False: its norm layers are "
                         "shared, so there are no per-scale statistics to calibrate")
    inner = unwrap(model)
    chosen = list(ctx.scales) if scales is None else [ctx.scales[ctx.index(s)] for s in scales]
    if num_batches < 1:
        raise ValueError("num_batches must be at least 1")
    batches: List[torch.Tensor] = []
    device = model_device(inner)
    for batch in data:
        batches.append(images_of(batch))
        if len(batches) >= num_batches:
            break
    if not batches:
        raise ValueError("calibrate got no batches from data")
    if len(batches) < num_batches:
        warnings.warn(
            f"calibrate: asked for {num_batches} batches but the data holds {len(batches)} "
            f"({sum(int(x.shape[0]) for x in batches)} images); the statistics come from those. "
            "Pass num_batches to match, or more data for steadier statistics",
            UserWarning, stacklevel=2)
    with Steps(len(chosen), "calibrate", progress) as steps:
        for _, route in scale_runs(ctx, [ctx.index(s) for s in chosen]):
            with torch.no_grad(), _collecting(inner, scale_key(route.size)) as bns, pinned(ctx, route):
                for x in batches:
                    inner(resize_to(x.to(device, non_blocking=True), route.size, ctx.antialias))
                _reduce_across_ranks(bns)
            steps.advance(f"scale {scale_key(route.size)}, {len(batches)} batches")
    return model


def add_scale(model: nn.Module, s: Scale, init_from: Union[Scale, str] = "interpolate") -> nn.Module:
    """Add a branch for scale ``s``; by default interpolated from the scales on either side.

    ``init_from="interpolate"`` (the default) sets every floating-point parameter and
    statistic of the new branch by linear interpolation in pixel count between the two scales
    on either side of ``s`` (the blend ``unknown_scale="interpolate"`` serves ``s`` with, see
    :mod:`sct_convert.core.rule`), or copies the nearest scale when ``s`` lies outside them;
    ``init_from=<scale>`` copies that scale's branch. On
    Fashion-MNIST this beats the nearest branch at most in-between sizes, and calibrating the new
    branch (``sct.calibrate(model, data, scales=[s])``) beats both
    (``benchmarks/reproduce.py``). The new scale goes last in ``scales_of``; routing,
    save/load and export see it. Like ``convert``, it warns when the model's train-mode
    forward fails at ``s`` but runs at the largest other scale.

    Args:
        model: a converted model; changed in place.
        s: the new scale, an int (square) or ``(height, width)``; not one the model has.
        init_from: ``"interpolate"``, or an existing scale whose branch to copy.

    Returns:
        ``model``. Raises ``ValueError`` if ``s`` is already a scale, ``init_from`` is not one, or
        the model does not run at ``s``.
    """
    ctx = context_of(model)
    inner = unwrap(model)
    hw = normalize_scale(s)
    if hw in ctx.sizes:
        raise ValueError(f"scale {s!r} is already one of the model's scales {list(ctx.scales)}")
    if isinstance(init_from, str) and init_from != "interpolate":
        raise ValueError(f"init_from={init_from!r}: give one of the model's scales or 'interpolate'")
    if init_from == "interpolate":
        mix, source = bracket(hw, ctx.sizes), nearest_index(hw, ctx.sizes)
    else:
        mix, source = None, ctx.index(init_from)
    source_key, key = scale_key(ctx.sizes[source]), scale_key(hw)
    lead = ctx.probe_lead
    entry = _measure_entry_size(inner, ctx, hw, source, lead)
    for _, layer in scale_specific_layers(inner):
        branch = copy.deepcopy(layer.branches[source_key])
        if mix is not None:
            (lo, hi, t) = mix
            _blend_into(branch, layer.branches[scale_key(ctx.sizes[lo])],
                        layer.branches[scale_key(ctx.sizes[hi])], t)
        layer.branches[key] = branch
    ctx.set_scales(ctx.scales + ((s if isinstance(s, int) else tuple(s)),), ctx.sizes + (hw,))
    ctx.entry_sizes.append(entry)
    failure = _training_failure_at(inner, ctx, len(ctx.sizes) - 1, lead)
    if failure:
        warnings.warn(failure, UserWarning, stacklevel=2)
    return model


def _training_failure_at(model: nn.Module, ctx: ScaleContext, index: int, lead: Tuple[int, ...]) -> Optional[str]:
    """convert's train-mode check for one scale of a converted model, with sampling held off."""
    sampling, ctx.sampling = ctx.sampling, False  # one plain forward at the input's own size
    try:
        with rng_kept(model):
            return training_failure(model, ctx.sizes, ctx.scales, lead, index)
    finally:
        ctx.sampling = sampling


@torch.no_grad()
def _blend_into(target: nn.Module, low: nn.Module, high: nn.Module, t: float) -> None:
    """target's floating tensors = (1 - t) * low's + t * high's (counters are left as copied)."""
    blended = blended_state(low, high, t)
    for name, tensor in list(target.named_parameters()) + list(target.named_buffers()):
        if tensor.is_floating_point():
            tensor.copy_(blended[name])


def _measure_entry_size(model: nn.Module, ctx: ScaleContext, hw: HW, source: int,
                        lead: Tuple[int, ...]) -> HW:
    """Spatial size the entry layer sees for an input at ``hw`` (one eval forward, the probe's).

    Every S-BN's ``sizes_here`` (its input size per scale, for TorchScript) gets the size it
    sees in the same forward, or is cleared when that size does not tell the new scale apart.
    """
    layers = dict(scale_specific_layers(model))
    log = SizeLog(model, {id(layer) for layer in layers.values()})
    try:
        with scale(model, ctx.scales[source]), rng_kept(model):  # the caller's RNG stream stays
            run_at_every_scale(model, [hw], [tuple(hw)], lead, log)
    finally:
        log.remove()
    seen = log.records[0]
    size = seen[ctx.entry_name][0]
    if size in ctx.entry_sizes:
        raise ValueError(f"scale {tuple(hw)} reaches the entry layer at the same size as an "
                         "existing scale; routing could not tell them apart")
    for name, layer in layers.items():
        calls = seen.get(name, [])
        here = calls[0] if len(calls) == 1 else None  # called twice: no size of its own
        if not layer.sizes_here or here is None or list(here) in layer.sizes_here:
            layer.sizes_here = []
        else:
            layer.sizes_here.append(list(here))
    return size


def remove_scale(model: nn.Module, s: Scale) -> nn.Module:
    """Drop scale ``s``'s branch from every S-BN layer.

    Args:
        model: a converted model; changed in place.
        s: one of its scales; the last remaining scale cannot be removed.

    Returns:
        ``model``. Raises ``ValueError`` when ``s`` is not a scale or is the only one.
    """
    ctx = context_of(model)
    inner = unwrap(model)
    index = ctx.index(s)
    if len(ctx.sizes) == 1:
        raise ValueError("cannot remove the model's only scale; use sct.extract(model, s) instead")
    key = scale_key(ctx.sizes[index])
    for _, layer in scale_specific_layers(inner):
        del layer.branches[key]
        if layer.sizes_here:
            del layer.sizes_here[index]
    keep = [i for i in range(len(ctx.sizes)) if i != index]
    ctx.set_scales(tuple(ctx.scales[i] for i in keep), tuple(ctx.sizes[i] for i in keep))
    ctx.entry_sizes = [ctx.entry_sizes[i] for i in keep]
    ctx.sample_subset = None
    return model
