"""SCT training: the Eq. 1 loss, sampling switches, and a memory-lean train step.

Drop-in use changes two lines of an existing loop::

    model = sct.convert(model, scales=[224, 192, 128])      # 1
    criterion = sct.SCTLoss(criterion)                      # 2
    ...
    loss = criterion(model(x), y)                           # unchanged: ScaleOutputs in train mode
"""
from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.googlenet import GoogLeNetOutputs
from torchvision.models.inception import InceptionOutputs

from ..core.route import Route, pinned
from ..core.context import ScaleContext
from ..core.scales import Scale, largest_index, model_device
from ..core.model import context_of
from .dense import MATCH_MODES, match_dense
from ..core.sampling import ScaleOutputs, resize_to, scale_runs

Weights = Union[None, Sequence[float], Mapping[Any, float]]

DISTILL_MODES = (None, "inplace", "ensemble")


def split_aux(output: Any) -> Tuple[Any, List[Tuple[torch.Tensor, float]]]:
    """(main output, [(aux logits, default weight)]) as torchvision's GoogLeNet / Inception-v3 train them.

    Any other output is its own main output, with no aux terms.
    """
    if isinstance(output, GoogLeNetOutputs):
        return output.logits, [(t, 0.3) for t in (output.aux_logits1, output.aux_logits2) if t is not None]
    if isinstance(output, InceptionOutputs):
        return output.logits, ([(output.aux_logits, 0.4)] if output.aux_logits is not None else [])
    return output, []


def main_logits(output: Any) -> torch.Tensor:
    """The classification logits of one model output, for distillation (a tensor, or ``.logits``)."""
    main, _ = split_aux(output)
    if isinstance(main, torch.Tensor):
        return main
    logits = getattr(main, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"distillation needs the model's logits, and a {type(output).__name__} output holds no tensor "
        "of logits (nor a .logits attribute); train dense or multi-output models with distill=None"
    )


def _kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1),
                    reduction="batchmean") * (t * t)


class SCTLoss(nn.Module):
    """Eq. 1 of the paper: ``sum_i alpha_i * base(f(x^i), y)``, alpha_i = 1/M by default.

    ``base`` gets each scale's output as the model returns it (a tensor, or a dict, list, named
    tuple or dataclass, e.g. torchvision's segmentation ``{"out", "aux"}``), once per scale, with
    the target. ``weights`` is one weight per output scale (a sequence in the model's scale order,
    or a mapping ``{scale: weight}``). Class targets pass unchanged, so hard labels and soft
    (mixup / cutmix) targets work alike. A per-pixel target (3 or more dims, e.g. ``(N, H, W)``
    labels at the input's size) is matched to each scale's output (``match``, see
    :mod:`sct_convert.training.dense`): by default it is resized to the output's (H, W), nearest-neighbour
    for labels (``ignore_index`` kept), bilinear for soft ``(N, C, H, W)`` targets;
    ``match="output"`` upsamples the outputs to the target instead. torchvision GoogLeNet /
    Inception-v3 aux logits add ``aux_weight x base(aux)`` per scale (default 0.3 each / 0.4, as
    their papers train them). A plain model output (eval, sampling off) goes to ``base`` directly.

    ``distill="inplace"`` adds, for every scale but the largest, ``distill_weight x KL`` to the
    largest scale's detached predictions; ``distill="ensemble"`` distils every scale from the
    weighted mean of all scales' detached logits. The paper itself uses neither (off by default);
    both need logits (a tensor output). ``last_losses`` holds the detached per-scale base losses
    of the last call, for logging.

    Args:
        base: the loss of one scale's output, e.g. ``nn.CrossEntropyLoss()``.
        weights: alpha_i per scale; ``None`` for 1/M each.
        aux_weight: weight of auxiliary logits (GoogLeNet / Inception-v3); ``None`` for theirs.
        distill: ``None``, ``"inplace"`` or ``"ensemble"``.
        distill_weight: weight of each distillation term.
        temperature: softmax temperature of the distillation KL.
        match: how a dense target meets each scale's output: ``"target"`` (resize the target),
            ``"output"`` (upsample the outputs) or ``"none"`` (the criterion does it).
    """

    def __init__(
        self,
        base: Callable[..., torch.Tensor],
        weights: Weights = None,
        *,
        aux_weight: Optional[float] = None,
        distill: Optional[str] = None,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        match: str = "target",
    ) -> None:
        super().__init__()
        if distill not in DISTILL_MODES:
            raise ValueError(f"distill={distill!r}: choose None, 'inplace' or 'ensemble'")
        if match not in MATCH_MODES:
            raise ValueError(f"match={match!r}: choose 'target' (resize per-pixel targets to each "
                             "output), 'output' (upsample outputs to the target) or 'none'")
        self.base = base
        self.weights = weights
        self.aux_weight = aux_weight
        self.distill = distill
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.match = match
        self.last_losses: Dict[Scale, torch.Tensor] = {}

    def scale_weights(self, scales: Sequence[Scale]) -> List[float]:
        """alpha_i for outputs at ``scales``."""
        if self.weights is None:
            return [1.0 / len(scales)] * len(scales)
        if isinstance(self.weights, Mapping):
            missing = [s for s in scales if s not in self.weights]
            if missing:
                raise ValueError(f"SCTLoss weights give no weight for scales {missing}")
            return [float(self.weights[s]) for s in scales]
        weights = [float(w) for w in self.weights]
        if len(weights) != len(scales):
            raise ValueError(
                f"SCTLoss has {len(weights)} weights for {len(scales)} output scales {list(scales)}; "
                "pass a {scale: weight} mapping when training on subsets of scales"
            )
        return weights

    def single_loss(self, output: Any, target: Any, teacher: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Loss of one scale's output: base loss (dense target matched), aux heads, distillation."""
        output, target = match_dense(output, target, self.match)
        main, aux_terms = split_aux(output)
        loss = self.base(main, target)
        for aux, default in aux_terms:
            loss = loss + (self.aux_weight if self.aux_weight is not None else default) * self.base(aux, target)
        if teacher is not None:
            loss = loss + self.distill_weight * _kd(main_logits(output), teacher, self.temperature)
        return loss

    def teacher(self, outputs: ScaleOutputs, weights: Sequence[float]) -> Optional[torch.Tensor]:
        if self.distill is None or len(outputs) < 2:
            return None
        logits = [main_logits(o).detach() for o in outputs]
        if self.distill == "inplace":
            return logits[largest_index(outputs.scales)]
        total = sum(weights)
        return sum(w * lg.float() for w, lg in zip(weights, logits)) / total

    def forward(self, outputs: Any, target: Any) -> torch.Tensor:
        if not isinstance(outputs, ScaleOutputs):
            return self.single_loss(outputs, target)
        weights = self.scale_weights(outputs.scales)
        teacher = self.teacher(outputs, weights)
        teacher_index = largest_index(outputs.scales) if self.distill == "inplace" else None
        total, per_scale = 0.0, {}
        for i, (s, out, w) in enumerate(zip(outputs.scales, outputs, weights)):
            use = None if i == teacher_index else teacher
            loss = self.single_loss(out, target, use)
            per_scale[s] = loss.detach()
            total = total + w * loss
        self.last_losses = per_scale
        return total


def set_sampling(model: nn.Module, enabled: bool = True, scales: Optional[Sequence[Scale]] = None,
                 *, between: Optional[bool] = None) -> None:
    """Switch the train-mode scale sampling on or off, or restrict it to some ``scales``.

    With sampling off a train-mode forward returns the model's own output, routed by input
    size like eval; feed each scale yourself under ``sct.scale(model, s)``.

    With ``between``, each sampling step (and ``train_step``) also runs the batch at one random
    size strictly between the smallest and largest scale, drawn from torch's RNG, as one more
    output of :class:`ScaleOutputs` (its ``scales`` entry is that size). It runs the branch the
    routing policy gives that size: under ``unknown_scale="interpolate"`` the blend of the two
    bracketing branches (both get gradient; neither's running statistics change), otherwise
    the nearest branch. ``SCTLoss``'s default weights then average over M + 1 outputs.

    Args:
        model: a converted model.
        enabled: sample every scale (or ``scales``) in train mode.
        scales: restrict sampling to these scales; ``None`` for all.
        between: also train one random in-between size per step; ``None`` keeps the setting.

    Returns:
        None.
    """
    ctx = context_of(model)
    ctx.sampling = enabled
    ctx.sample_subset = None if scales is None else sorted({ctx.index(s) for s in scales})
    if between is not None:
        ctx.sample_between = bool(between)


@contextlib.contextmanager
def sampling_scales(model: nn.Module, scales: Sequence[Scale]) -> Iterator[nn.Module]:
    """Train on a subset of scales inside the block (the same subset on every DDP rank!).

    Args:
        model: a converted model.
        scales: the scales train-mode forwards sample inside the block.

    Returns:
        A context manager; on exit the model samples every scale again.
    """
    ctx = context_of(model)
    previous = ctx.sample_subset
    set_sampling(model, ctx.sampling, scales)
    try:
        yield model
    finally:
        ctx.sample_subset = previous


def random_scale_subset(model: nn.Module, k: int, step: int, seed: int = 0) -> List[Scale]:
    """``k`` scales drawn from ``(seed, step)`` alone, so every rank draws the same subset.

    Args:
        model: a converted model.
        k: how many scales to draw (at most the number of scales).
        step: the training step; each step draws afresh.
        seed: the run's seed.

    Returns:
        ``k`` of the model's scales, in the model's order. Use with :func:`sampling_scales` or
        ``train_step(..., scales=...)`` to train a random subset each step.
    """
    scales = list(context_of(model).scales)
    rng = random.Random(seed * 1_000_003 + step)
    chosen = set(rng.sample(range(len(scales)), k))
    return [s for i, s in enumerate(scales) if i in chosen]


@dataclass
class StepResult:
    """What :func:`train_step` did: the Eq. 1 loss and each scale's weighted loss.

    Detached 0-d tensors on the model's device: reading them (``.item()``) is the caller's
    choice, so a step never waits for the GPU.

    Attributes:
        loss: the weighted sum over scales.
        per_scale: each scale's weighted loss, by scale.
    """

    loss: torch.Tensor
    per_scale: Dict[Scale, torch.Tensor] = field(default_factory=dict)


def _sum_of_losses(output: Dict[str, torch.Tensor], target: Any) -> torch.Tensor:
    """A torchvision detection model's loss: the sum of its dict of losses, as its references take it."""
    return sum(output.values())


def train_step(
    model: nn.Module,
    x: Any,
    y: Any,
    criterion: Optional[Callable[..., torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: Optional[Any] = None,
    *,
    scales: Optional[Sequence[Scale]] = None,
    amp_dtype: Optional[torch.dtype] = None,
    clip_grad_norm: Optional[float] = None,
    zero_grad: bool = True,
) -> StepResult:
    """One SCT optimisation step, forward and backward one scale at a time.

    Gradients are those of the drop-in loop (``criterion(model(x), y).backward()``), but only
    one scale's activations are alive at a time, so peak activation memory is that of the
    largest scale instead of the sum. ``model`` may be wrapped in DDP: all but the last scale
    run under ``no_sync``, so gradients are all-reduced once per step (wrap with
    ``find_unused_parameters=True``: each scale leaves the other branches unused).

    Args:
        model: a converted model in train mode (may be wrapped in DDP).
        x: the batch at any size; it is resized to each scale. For a torchvision detection model,
            its list of images (its transform resizes them to each scale).
        y: the targets, passed to ``criterion`` (a per-pixel target is matched to each scale);
            a detection model's list of target dicts goes to the model, ``model(x, y)``.
        criterion: an :class:`SCTLoss` (scale weights, distillation), or a plain loss
            ``criterion(outputs, y)`` wrapped in one; ``None`` for a detection model, whose
            loss is the sum of the dict of losses it returns.
        optimizer: stepped once after every scale's backward.
        scaler: a ``torch.amp.GradScaler`` for fp16.
        scales: the scales to run (default: those the model samples, see :func:`set_sampling`).
        amp_dtype: run the forwards under autocast in this dtype.
        clip_grad_norm: clip the total gradient norm to this before the step.
        zero_grad: zero the gradients first.

    Returns:
        A :class:`StepResult`: the weighted sum over scales (Eq. 1) and each scale's weighted
        loss, detached.
    """
    ctx = context_of(model)
    loss_fn = _step_criterion(ctx, criterion)
    indices = None if scales is None else sorted({ctx.index(s) for s in scales})
    runs = scale_runs(ctx, indices, between=ctx.sample_between and scales is None)
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    autocast = functools.partial(torch.autocast, device_type=model_device(model).type, dtype=amp_dtype) \
        if amp_dtype is not None else contextlib.nullcontext
    per_scale = _backward_each_scale(model, ctx, x, y, runs, loss_fn, scaler, autocast)
    _optimizer_step(optimizer, scaler, clip_grad_norm)
    return StepResult(sum(per_scale.values()), per_scale)


def _step_criterion(ctx: ScaleContext, criterion: Optional[Callable[..., torch.Tensor]]) -> SCTLoss:
    """``train_step``'s criterion as an :class:`SCTLoss`; refuses what one scale at a time cannot do."""
    if criterion is None and not ctx.resizer:
        raise ValueError("train_step needs a criterion; only a detection model, which returns its own "
                         "losses, takes criterion=None")
    loss_fn = criterion if isinstance(criterion, SCTLoss) else SCTLoss(criterion or _sum_of_losses)
    if loss_fn.distill == "ensemble":
        raise ValueError(
            "distill='ensemble' needs every scale's logits before any backward; use the drop-in "
            "loop (criterion(model(x), y)) or distill='inplace' with train_step"
        )
    return loss_fn


def _backward_each_scale(model: nn.Module, ctx: ScaleContext, x: Any, y: Any, runs: List[Tuple[Scale, Route]],
                         loss_fn: SCTLoss, scaler: Optional[Any],
                         autocast: Callable[[], Any]) -> Dict[Scale, torch.Tensor]:
    """Forward and backward each scale in turn (the in-place teacher first); the weighted losses."""
    chosen = [s for s, _ in runs]
    weights = loss_fn.scale_weights(chosen)
    order = list(range(len(runs)))
    teacher_pos = largest_index(chosen) if loss_fn.distill == "inplace" and len(chosen) > 1 else None
    if teacher_pos is not None:  # the teacher runs first; its detached logits teach the rest
        order.remove(teacher_pos)
        order.insert(0, teacher_pos)
    no_sync = getattr(model, "no_sync", None)
    teacher = None
    per_scale: Dict[Scale, torch.Tensor] = {}
    for n, pos in enumerate(order):
        last = n == len(order) - 1
        with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
            _, route = runs[pos]
            with pinned(ctx, route), autocast():
                # a detection model resizes its images (and boxes) itself, to the route's size
                output = model(x, y) if ctx.resizer else model(resize_to(x, route.size, ctx.antialias))
                loss = weights[pos] * loss_fn.single_loss(output, y, None if pos == teacher_pos else teacher)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if pos == teacher_pos:
            teacher = main_logits(output).detach()
        per_scale[chosen[pos]] = loss.detach()
        del output, loss
    return per_scale


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[Any], clip_grad_norm: Optional[float]) -> None:
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
