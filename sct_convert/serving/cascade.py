"""Anytime serving: answer each image at the smallest scale that is confident of it.

A converted classifier holds every scale. :class:`Cascade` runs a batch at its first (smallest)
stage, keeps the rows whose confidence reaches that stage's threshold, resizes the *original*
input of the others to the next stage's size (as SCT sampling resizes, :func:`resize_to`) and
runs only those, and so on; the last stage answers every row left. Each row's logits come from
the stage that answered it. :func:`fit_cascade` chooses the stages and thresholds on held-out
labelled data, counting multiply-accumulates with ``torch.utils.flop_counter``.

The rule, written once here and once in NumPy for the torch-free runtime
(:mod:`sct_convert.runtime`): confidence is the largest softmax probability (``"softmax"``) or
the gap between the two largest (``"margin"``); a row is answered where ``confidence >=
threshold``. Nothing is stored during a call: one cascade serves many threads.
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.model import context_of, is_converted, scale as pinned_scale, unwrap
from .._utils.batches import labelled
from ..metadata_fields import CONFIDENCES, read_cascade
from .._utils.modes import run_mode
from ..runtime import confidence_of as runtime_confidence
from ..core.sampling import resize_to
from ..core.scales import HW, Scale, model_device, model_dtype, pixels, scale_key, scale_of_size



class CascadeResult(NamedTuple):
    """What :meth:`Cascade.run` returns.

    Attributes:
        logits: ``(N, classes)``, each row from the stage that answered it.
        scales: ``(N,)`` LongTensor: the side (height) of the scale that answered each row.
        macs: ``(N,)`` LongTensor: multiply-accumulates spent on each row, over the stages it ran.
    """

    logits: torch.Tensor
    scales: torch.Tensor
    macs: torch.Tensor


class CascadeReport(NamedTuple):
    """How a fitted cascade did on its fit data (:func:`fit_cascade`).

    Attributes:
        top1: the cascade's top-1 accuracy, in percent.
        relative_macs: its mean MACs per image over one pass at the largest scale.
        answered: the share of images answered at each stage, smallest first.
        single_scale: each scale's own ``(top-1 %, relative MACs)``.
        stages: the cascade's stages, smallest first, with their thresholds (the last: None).
    """

    top1: float
    relative_macs: float
    answered: Dict[str, float]
    single_scale: Dict[str, Tuple[float, float]]
    stages: List[Tuple[Scale, Optional[float]]]

    def __str__(self) -> str:
        stages = " -> ".join(f"{scale_key(s)}" + (f" (>= {t:.3f})" if t is not None else "") for s, t in self.stages)
        singles = ", ".join(f"{k}: {a:.2f}% at {m:.2f}x" for k, (a, m) in self.single_scale.items())
        answered = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in self.answered.items())
        return (f"cascade {stages}: top-1 {self.top1:.2f}% at {self.relative_macs:.3f}x the MACs of the largest "
                f"scale; answered at {answered}; single scales {singles}")


def confidence_of(logits: torch.Tensor, how: str) -> torch.Tensor:
    """Per row: the largest softmax probability, or the gap between the two largest (``margin``),
    in float64 on ``logits``' device. The rule is :func:`sct_convert.runtime.confidence_of`'s, run
    on a host copy, so the eager cascade, its fitting and the torch-free runtime compare the very
    same numbers against a threshold."""
    conf = runtime_confidence(logits.detach().float().cpu().numpy(), how)
    return torch.from_numpy(conf).to(logits.device)


def count_macs(model: nn.Module, hw: HW) -> int:
    """Multiply-accumulates of one image at size ``hw`` (``torch.utils.flop_counter``: FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    ctx = context_of(model)
    module = unwrap(model)
    x = torch.zeros(1, *ctx.probe_lead[1:], *hw, device=model_device(module), dtype=model_dtype(module))
    counter = FlopCounterMode(display=False)
    with run_mode(module), torch.no_grad(), counter, pinned_scale(model, ctx.scales[ctx.sizes.index(tuple(hw))]):
        module(x)
    return int(counter.get_total_flops()) // 2


def _check_classifier(model: nn.Module) -> None:
    if not is_converted(model):
        raise ValueError("a cascade runs a converted model's scales: sct.convert(model, scales) first")
    if context_of(model).resizer:
        raise ValueError("a detector has no per-image confidence to escalate on yet: cascades serve classifiers "
                         "(N, classes) only")


def _stages(model: nn.Module, thresholds: Dict[Any, Optional[float]]) -> List[Tuple[Scale, HW, Optional[float]]]:
    """``thresholds`` checked and ordered smallest scale first; the last stage's threshold is None."""
    ctx = context_of(model)
    if not isinstance(thresholds, dict) or not thresholds:
        raise ValueError("thresholds maps each stage's scale to a confidence threshold, e.g. {128: 0.9, 224: None}")
    stages = []
    for s, t in thresholds.items():
        hw = ctx.sizes[ctx.index(s)]
        stages.append((ctx.scales[ctx.index(s)], hw, t))
    stages.sort(key=lambda st: pixels(st[1]))
    for s, _, t in stages[:-1]:
        if t is None or isinstance(t, bool) or not (0.0 < float(t) <= 1.0):
            raise ValueError(f"threshold {t!r} of stage {scale_key(s)}: a threshold is a confidence in (0, 1]")
    last = stages[-1]
    if last[2] is not None and (isinstance(last[2], bool) or not (0.0 < float(last[2]) <= 1.0)):
        raise ValueError(f"threshold {last[2]!r} of stage {scale_key(last[0])}: a threshold is a confidence in (0, 1] "
                         "(the last stage answers every row left; its threshold may be None)")
    return [(s, hw, None if i == len(stages) - 1 else float(t)) for i, (s, hw, t) in enumerate(stages)]


class Cascade(nn.Module):
    """A converted classifier served as a cascade of its scales, smallest first.

    Args:
        model: a converted classifier (image ``(N, C, H, W)`` or clip ``(N, C, T, H, W)`` input,
            ``(N, classes)`` output). Kept as a submodule; the cascade runs it in eval mode.
        thresholds: each stage's scale to its confidence threshold in ``(0, 1]``; any subset of the
            model's scales; the stage with the most pixels answers every row left (its threshold
            may be ``None``).
        confidence: ``"softmax"`` (the largest softmax probability) or ``"margin"`` (the gap
            between the two largest).

    ``cascade(x)`` returns the logits; :meth:`run` also tells which scale answered each row and
    what it cost. ``x`` may be any size: each stage resizes the original input to its own size.
    """

    def __init__(self, model: nn.Module, thresholds: Dict[Any, Optional[float]], confidence: str = "softmax") -> None:
        super().__init__()
        _check_classifier(model)
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence={confidence!r}: choose one of {', '.join(CONFIDENCES)}")
        self.model = model
        self.confidence = confidence
        self.stages = _stages(model, thresholds)
        self.macs = [count_macs(model, hw) for _, hw, _ in self.stages]
        self.report: Optional[CascadeReport] = None

    @property
    def thresholds(self) -> Dict[Scale, Optional[float]]:
        """Each stage's scale to its threshold, smallest first (the last: None)."""
        return {s: t for s, _, t in self.stages}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).logits

    def run(self, x: torch.Tensor) -> CascadeResult:
        """Run the cascade on a batch.

        Args:
            x: a batch ``(N, C, H, W)`` (or clips ``(N, C, T, H, W)``) of any size.

        Returns:
            A :class:`CascadeResult`: logits, the scale that answered each row, MACs per row.
        """
        if unwrap(self.model).training:
            raise ValueError("a cascade serves in eval mode: call cascade.eval() (or model.eval()) first")
        if x.dim() not in (4, 5):
            raise ValueError(f"a cascade takes a batch (N, C, H, W) or clips (N, C, T, H, W), got shape {tuple(x.shape)}")
        n = x.shape[0]
        antialias = context_of(self.model).antialias
        rows = torch.arange(n, device=x.device)
        logits: Optional[torch.Tensor] = None
        answered = torch.zeros(n, dtype=torch.long)
        macs = torch.zeros(n, dtype=torch.long)
        for (s, hw, threshold), cost in zip(self.stages, self.macs):
            with torch.no_grad(), pinned_scale(self.model, s):
                out = self.model(resize_to(x[rows] if len(rows) < n else x, hw, antialias))
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ValueError("a cascade escalates on per-image class scores: the model must return "
                                 f"(N, classes) logits, it returned {type(out).__name__}"
                                 + (f" {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
                                 + " (segmentation and detection have no per-image confidence yet)")
            if logits is None:
                logits = out.new_empty(n, out.shape[1])
            macs[rows.cpu()] += cost
            keep = (torch.ones(len(rows), dtype=torch.bool, device=out.device) if threshold is None
                    else confidence_of(out, self.confidence) >= threshold)
            done = rows[keep]
            logits[done] = out[keep]
            answered[done.cpu()] = hw[0]
            rows = rows[~keep]
            if len(rows) == 0:
                break
        return CascadeResult(logits, answered, macs)

    def metadata(self) -> Dict[str, str]:
        """What a file records of the cascade (``sct_convert.cascade``, JSON): stages, thresholds,
        sizes, MACs, the confidence rule and the resize's antialiasing."""
        return {"cascade": json.dumps({
            "confidence": self.confidence, "antialias": bool(context_of(self.model).antialias),
            "stages": [{"scale": scale_key(hw), "size": list(hw), "threshold": t, "macs": m}
                       for (_, hw, t), m in zip(self.stages, self.macs)]})}


def cascade_from_metadata(model: nn.Module, meta: Dict[str, str], path: object = "the file") -> Cascade:
    """The :class:`Cascade` a file's metadata records (``ValueError`` when it records none)."""
    if "cascade" not in meta:
        raise ValueError("this file records no cascade: fit one with sct.fit_cascade and save it with sct.save(cascade, path)")
    spec = read_cascade(meta, path, context_of(model).scales)
    return Cascade(model, {scale_of_size(st["size"]): st["threshold"] for st in spec["stages"]}, spec["confidence"])


def _scale_logits(model: nn.Module, loader: Iterable, progress: bool) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Every scale's logits on every image of ``loader``, and the labels."""
    from .._utils.progress import Steps

    ctx = context_of(model)
    per_scale: List[List[torch.Tensor]] = [[] for _ in ctx.sizes]
    labels: List[torch.Tensor] = []
    device = model_device(unwrap(model))
    batches = list(loader) if not isinstance(loader, (list, tuple)) else loader
    with Steps(len(batches), "fit cascade: run every scale", progress) as steps:
        for item in batches:
            x, y = labelled(item, "fit_cascade")
            x = x.to(device)
            for i, (s, hw) in enumerate(zip(ctx.scales, ctx.sizes)):
                with torch.no_grad(), pinned_scale(model, s):
                    out = unwrap(model)(resize_to(x, hw, ctx.antialias))
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    raise ValueError("fit_cascade needs a classifier returning (N, classes) logits")
                per_scale[i].append(out.float().cpu())
            labels.append(y.cpu().long())
            steps.advance(f"{sum(len(t) for t in labels)} images")
    return [torch.cat(p) for p in per_scale], torch.cat(labels)


def fit_cascade(model: nn.Module, loader: Iterable, *, max_drop: float = 0.5, budget: Optional[float] = None,
                stages: Optional[Sequence[Scale]] = None, confidence: str = "softmax",
                progress: bool = False) -> Cascade:
    """Choose a cascade's stages and thresholds on held-out labelled data.

    Every scale runs once on every image; then every ordered subset of the scales (or the given
    ``stages``) and thresholds from a grid of the fit data's own confidences are scored exactly on
    those logits. Without ``budget``: the cheapest cascade (mean MACs per image) whose top-1 is
    within ``max_drop`` points of the best single scale. With ``budget``: the most accurate one
    whose mean MACs are at most ``budget`` times one pass at the largest scale.

    Args:
        model: a converted classifier (put in eval mode).
        loader: ``(images, labels)`` batches at any size (each scale resizes them).
        max_drop: top-1 points the cascade may lose against the best single scale (>= 0).
        budget: a MACs budget, as a fraction of the largest scale's (in (0, 1]); overrides ``max_drop``.
        stages: the scales to use (default: choose among all subsets).
        confidence: ``"softmax"`` or ``"margin"``.
        progress: report each batch.

    Returns:
        A :class:`Cascade` whose ``report`` (:class:`CascadeReport`) gives its top-1, relative
        MACs and the share answered at each stage, on the fit data.
    """
    _check_classifier(model)
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence={confidence!r}: choose one of {', '.join(CONFIDENCES)}")
    if max_drop is None or float(max_drop) < 0:
        raise ValueError(f"max_drop={max_drop!r}: top-1 points the cascade may lose, >= 0")
    if budget is not None and not (0.0 < float(budget) <= 1.0):
        raise ValueError(f"budget={budget!r}: a fraction of the largest scale's MACs, in (0, 1]")
    ctx = context_of(model)
    unwrap(model).eval()
    chosen = list(range(len(ctx.sizes))) if stages is None else sorted({ctx.index(s) for s in stages})
    macs = [count_macs(model, hw) for hw in ctx.sizes]
    logits, labels = _scale_logits(model, loader, progress)
    if len(labels) == 0:
        raise ValueError("fit_cascade got no data: the loader yielded no batches")
    correct = np.stack([(lg.argmax(1) == labels).numpy() for lg in logits])
    conf = np.stack([confidence_of(lg, confidence).numpy() for lg in logits])
    largest = max(macs)
    single = {scale_key(ctx.sizes[i]): (100 * correct[i].mean(), macs[i] / largest) for i in range(len(macs))}
    best = max(100 * correct[i].mean() for i in chosen)

    candidates = []
    subsets = ([chosen] if stages is not None else
               [list(c) for r in range(1, len(chosen) + 1) for c in itertools.combinations(chosen, r)])
    for subset in subsets:
        order = sorted(subset, key=lambda i: pixels(ctx.sizes[i]))
        grids = [_threshold_grid(conf[i]) for i in order[:-1]]
        for ts in itertools.product(*grids):
            acc, cost, shares = _simulate(order, ts, conf, correct, macs)
            candidates.append((acc, cost / largest, order, ts, shares))
    if budget is not None:
        within = [c for c in candidates if c[1] <= float(budget) + 1e-12]
        if not within:
            cheapest = min(c[1] for c in candidates)
            raise ValueError(f"no cascade fits budget={budget}: the cheapest costs {cheapest:.3f}x the largest scale")
        pick = max(within, key=lambda c: (c[0], -c[1]))
    else:
        within = [c for c in candidates if c[0] >= best - float(max_drop) - 1e-9]
        if not within:  # only with given stages that cannot reach the best of them
            raise ValueError(f"no cascade of stages {[scale_key(ctx.sizes[i]) for i in chosen]} is within "
                             f"max_drop={max_drop} of their best single scale ({best:.2f}%): raise max_drop")
        pick = min(within, key=lambda c: (c[1], -c[0]))
    acc, rel, order, ts, shares = pick
    cascade = Cascade(model, {ctx.scales[i]: (ts[k] if k < len(ts) else None) for k, i in enumerate(order)},
                      confidence)
    cascade.report = CascadeReport(float(acc), float(rel),
                                   {scale_key(ctx.sizes[i]): float(sh) for i, sh in zip(order, shares)},
                                   single, [(s, t) for s, _, t in cascade.stages])
    return cascade


def _threshold_grid(conf: np.ndarray, points: int = 40) -> List[float]:
    """Candidate thresholds for one stage: quantiles of its confidences, halfway to the next
    distinct value (so that a confidence a hair off in another runtime falls on the same side),
    and half the smallest (the stage answers every row)."""
    values = np.unique(conf)
    picks = np.unique(np.quantile(values, np.linspace(0, 1, points)))
    grid = [float(values[0]) / 2] if values[0] > 0 else []
    for v in picks:
        above = values[values > v]
        t = float((v + above[0]) / 2) if len(above) else 1.0
        if 0.0 < t <= 1.0:
            grid.append(t)
    return sorted(set(grid)) or [1.0]


def _simulate(order: Sequence[int], thresholds: Sequence[float], conf: np.ndarray, correct: np.ndarray,
              macs: Sequence[int]) -> Tuple[float, float, List[float]]:
    """Top-1 %, mean MACs per image and the share answered per stage of one cascade, from each
    scale's confidences and correctness on the fit data."""
    n = conf.shape[1]
    left = np.ones(n, dtype=bool)
    right, cost, shares = 0, 0.0, []
    for k, i in enumerate(order):
        cost += macs[i] * left.sum()
        take = left & (conf[i] >= thresholds[k]) if k < len(thresholds) else left.copy()
        right += int(correct[i][take].sum())
        shares.append(take.sum() / n)
        left &= ~take
    return 100 * right / n, cost / n, shares


__all__ = ["Cascade", "CascadeReport", "CascadeResult", "fit_cascade"]
