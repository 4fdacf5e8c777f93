"""What a model gives at each input size, before and after SCT: accuracy and latency per scale.

Arms, per scale:

- ``plain``: the original model as it is, fed images preprocessed at that size;
- ``calibrated``: the model converted to those scales with every branch's BN statistics
  re-estimated on unlabeled images (``sct.calibrate``), no training;
- ``trained``: an SCT-trained (converted) model's own branches.

Preprocessing follows the model's own data config, as timm's ``validate.py`` does: timm's
``resolve_data_config`` (mean, std, interpolation, crop_pct; overridable), and at each size a
resize to ``size / crop_pct`` and a center crop to the size (``timm.data.create_transform``).
Images are read as timm reads a folder (``timm.data.ImageDataset``: class folders in natural sort
order, RGB or, for one-channel models, L).
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..training.calibration import calibrate
from ..core.scales import HW, Scale, largest_index, model_device, normalize_scale, scale_key
from ..conversion.rewrite import OneScaleWarning, convert
from ..core.rule import UnknownSizeWarning
from ..core.model import context_of, is_converted, route, unwrap
from .data import image_dataset, loader_at, resolve_data_config, split_indices
from .report import EvaluationReport, ScaleResult
from .._utils.files import PathLike
from ..checkpoints.format import num_classes_of
from .._utils.modes import run_mode
from .._utils.progress import Steps

LATENCY_BATCHES = (1, 32)


#: Seconds of timed forwards per (arm, size, batch) cell of the latency table, after the warm-up.
LATENCY_BUDGET_S = 2.0


@torch.inference_mode()
def paired_latency_ms(models: Dict[str, nn.Module], shape: Sequence[int], repeats: int, device: torch.device,
                      budget_s: float = LATENCY_BUDGET_S,
                      clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median milliseconds per image of each model on one random batch of ``shape``, timed in turns.

    Two warm-up forwards each first (the first call at a new size builds kernels and caches, which
    is not the serving cost), then rounds of one timed forward per model, the order alternating,
    up to ``repeats`` rounds or until ``budget_s`` seconds per model are spent (at least one
    round), so that load on the machine hits every model alike and a large model on a CPU cannot
    stall the report. ``clock`` is the time source (seconds), replaceable in tests.
    """
    x = torch.randn(*shape, device=device)

    def timed(model: nn.Module) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    names = list(models)
    for name in names * 2:
        timed(models[name])
    times: Dict[str, List[float]] = {name: [] for name in names}
    while not times[names[0]] or (len(times[names[0]]) < repeats
                                  and sum(map(sum, times.values())) < budget_s * len(names)):
        for name in (names if len(times[names[0]]) % 2 == 0 else names[::-1]):
            times[name].append(timed(models[name]))
    return {name: statistics.median(t) * 1000 / shape[0] for name, t in times.items()}


def latency_ms(model: nn.Module, shape: Sequence[int], repeats: int, device: torch.device,
               budget_s: float = LATENCY_BUDGET_S, clock: Callable[[], float] = time.perf_counter) -> float:
    """:func:`paired_latency_ms` of one model."""
    return paired_latency_ms({"model": model}, shape, repeats, device, budget_s, clock)["model"]


@torch.inference_mode()
def _score(models: Dict[str, nn.Module], loader: torch.utils.data.DataLoader,
           device: torch.device) -> Dict[str, Tuple[float, float, int]]:
    """Top-1 / top-5 (percent) and image count of each model on one pass over ``loader``."""
    hits = {arm: [0, 0] for arm in models}
    seen = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        seen += len(targets)
        for arm, model in models.items():
            logits = model(images)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits[arm][0] += int((top[:, 0] == targets).sum())
            hits[arm][1] += int((top == targets[:, None]).any(-1).sum())
    return {arm: (100 * h[0] / max(seen, 1), 100 * h[1] / max(seen, 1), seen) for arm, h in hits.items()}


def evaluate(
    model: nn.Module,
    images: PathLike,
    scales: Sequence[Scale],
    *,
    calibrate_images: Optional[PathLike] = None,
    holdout: int = 1000,
    max_images: Optional[int] = None,
    batch_size: int = 64,
    data_config: Optional[Dict[str, Any]] = None,
    class_map: Any = None,
    latency_repeats: int = 5,
    workers: int = 0,
    cascade: bool = False,
    progress: bool = False,
) -> EvaluationReport:
    """Top-1, top-5 and latency of ``model`` at each of ``scales``: plain, calibrated or trained.

    A plain model is scored as it is (``arm="plain"``) and converted to ``scales`` with every
    branch calibrated (``arm="calibrated"``; the model itself is not changed). A converted model is
    scored with its own branches (``arm="trained"``); sizes it has no branch for follow its routing
    policy. Images are preprocessed at each size from the model's data config (see module doc).

    Args:
        model: a plain model (its weights loaded) or a converted, SCT-trained one.
        images: a labelled folder, one sub-folder per class (class order: natural sort, as timm).
        scales: the input sizes to score, ints or ``(height, width)``.
        calibrate_images: a folder of images (labels unused) for the calibrated arm. Without it,
            ``holdout`` images of ``images`` (a seeded draw) calibrate and are not scored.
        holdout: images held out of ``images`` for calibration when ``calibrate_images`` is None.
        max_images: score at most this many images (after the holdout).
        batch_size: images per batch, for scoring and calibration.
        data_config: overrides of timm's data config (``mean``, ``std``, ``crop_pct``, ...).
        class_map: timm's ``class_map`` (a file or dict of folder name to index).
        latency_repeats: timed forwards per (arm, scale, batch) for the median latency at batch 1, 32; 0: none.
        workers: ``DataLoader`` worker processes.
        cascade: also fit cascades (:func:`sct_convert.fit_cascade`, ``max_drop`` 0, 0.3, 0.5, 1)
            on a seeded half of the scored images and score them on the other half: one row each
            (``scale="cascade"``), with MACs relative to the largest scale, as every converted
            arm's rows get.
        progress: report each (scale) step: a bar on a terminal, one line otherwise.

    Returns:
        An :class:`EvaluationReport` with one row per (scale, arm), scales in the given order;
        ``report.write("r.csv" | "r.md" | "r.json")`` and ``report.plot("r.png")`` save it.
    """
    sizes = [normalize_scale(s) for s in scales]
    if not sizes:
        raise ValueError("evaluate needs at least one scale")
    config = resolve_data_config(model, data_config)
    dataset = image_dataset(images, config, class_map)
    notes = [_preprocessing_note(config)] + _class_count_notes(model, dataset, images, class_map)
    if is_converted(model):
        scored, _ = split_indices(len(dataset), 0, max_images)
        arms: Dict[str, nn.Module] = {"trained": model}
        notes += _untrained_size_notes(model, sizes)
    else:
        calibration_set, scored = _calibration_source(dataset, images, calibrate_images, config, holdout,
                                                      max_images, class_map, notes)
        arms = {"plain": model,
                "calibrated": _calibrated(model, sizes, calibration_set, config, batch_size, workers, progress)}
    notes.insert(0, f"{len(scored)} scored images from {images}")
    loaders = (loader_at(dataset, scored, config, hw, batch_size, workers) for hw in sizes)
    rows = _score_each_size(arms, sizes, loaders, config["input_size"][0], latency_repeats, progress)
    converted_arms = {arm: m for arm, m in arms.items() if is_converted(m)}
    _relative_macs(rows, converted_arms)
    if cascade:
        rows += _cascade_rows(converted_arms, sizes, dataset, scored, config, batch_size, workers, progress, notes)
    return EvaluationReport(rows, notes, {k: v for k, v in config.items()})


#: The ``max_drop`` values of the cascades ``evaluate(cascade=True)`` fits.
CASCADE_DROPS = (0.0, 0.3, 0.5, 1.0)


def _relative_macs(rows: List[ScaleResult], arms: Dict[str, nn.Module]) -> None:
    """Fill each converted arm's rows at its own scales with MACs relative to its largest scale."""
    from ..serving.cascade import count_macs

    for arm, model in arms.items():
        ctx = context_of(model)
        macs = {scale_key(hw): count_macs(model, hw) for hw in ctx.sizes}
        largest = max(macs.values())
        for row in rows:
            if row.arm == arm and row.scale in macs:
                row.relative_macs = round(macs[row.scale] / largest, 4)


def _cascade_rows(arms: Dict[str, nn.Module], sizes: List[HW], dataset: Any, scored: List[int],
                  config: Dict[str, Any], batch_size: int, workers: int, progress: bool,
                  notes: List[str]) -> List[ScaleResult]:
    """Cascades of each converted arm over the scored sizes it has branches for, fitted on one half
    of the scored images and scored on the other."""
    from ..serving.cascade import count_macs, fit_cascade

    if not arms:
        raise ValueError("cascades run a converted model's scales: evaluate an sct file, or a plain model "
                         "(its calibrated arm)")
    order = torch.randperm(len(scored), generator=torch.Generator().manual_seed(1)).tolist()
    fit_part, test_part = [scored[i] for i in order[: len(order) // 2]], [scored[i] for i in order[len(order) // 2:]]
    if not fit_part or not test_part:
        raise ValueError("too few scored images to fit a cascade on half and score it on the other half")
    rows = []
    for arm, model in arms.items():
        ctx = context_of(model)
        stages = [hw for hw in sizes if hw in ctx.sizes]
        if not stages:
            continue
        largest = stages[largest_index(stages)]
        fit_batches = list(loader_at(dataset, fit_part, config, largest, batch_size, workers))
        test_batches = list(loader_at(dataset, test_part, config, largest, batch_size, workers))
        x_test = torch.cat([b[0] for b in test_batches])
        y_test = torch.cat([b[1] for b in test_batches])
        full = ctx.sizes[largest_index(ctx.sizes)]
        with Steps(len(CASCADE_DROPS), f"cascades ({arm})", progress) as steps:
            for drop in CASCADE_DROPS:
                fitted = fit_cascade(model, fit_batches, max_drop=drop, stages=stages)
                result = fitted.run(x_test.to(model_device(unwrap(model))))
                top = result.logits.topk(min(5, result.logits.shape[-1]), dim=-1).indices.cpu()
                relative = result.macs.double().mean().item() / count_macs(model, full)
                rows.append(ScaleResult("cascade", f"{arm} cascade max_drop={drop:g}",
                                        round(100 * (top[:, 0] == y_test).double().mean().item(), 2),
                                        round(100 * (top == y_test[:, None]).any(-1).double().mean().item(), 2),
                                        len(y_test), relative_macs=round(relative, 4), cascade_of=arm))
                steps.advance(f"max_drop {drop:g}: " + " -> ".join(scale_key(s) for s in fitted.thresholds))
    notes.append(f"cascade rows: stages and thresholds fitted (sct.fit_cascade) on {len(fit_part)} of the scored "
                 f"images (a seeded half), top-1 and MACs on the other {len(test_part)}; MACs from "
                 "torch.utils.flop_counter, relative to one pass at the largest scale")
    return rows


def _class_count_notes(model: nn.Module, dataset: Any, images: PathLike, class_map: Any) -> List[str]:
    """A warning (and a note in the report) when the folder's classes cannot be the model's."""
    folders = getattr(getattr(dataset, "reader", None), "class_to_idx", None) or {}
    predicted = num_classes_of(unwrap(model))
    if class_map or not folders or predicted is None or len(folders) == predicted:
        return []
    note = (f"{images} holds {len(folders)} class folders but the model predicts {predicted} classes: a folder's "
            "label is its index in natural sort order, so top-1 is only meaningful if those indices are the "
            "model's; pass sct.evaluate(..., class_map=...) to map folder names to the model's class indices")
    warnings.warn(note, UserWarning, stacklevel=3)
    return [note]


def _preprocessing_note(config: Dict[str, Any]) -> str:
    return (f"preprocessing: resize to size / crop_pct ({config['crop_pct']}), center crop, "
            f"{config['interpolation']}, mean {tuple(config['mean'])}, std {tuple(config['std'])} "
            "(timm's data config, as validate.py)")


def _untrained_size_notes(model: nn.Module, sizes: List[HW]) -> List[str]:
    ctx = context_of(model)
    return [f"{scale_key(hw)} has no branch of its own: served by {route(model, hw)!r} "
            f"(unknown_scale={ctx.unknown_scale!r})" for hw in sizes if hw not in ctx.sizes]


def _score_each_size(arms: Dict[str, nn.Module], sizes: List[HW], loaders: Iterable[Any], channels: int,
                     latency_repeats: int, progress: bool) -> List[ScaleResult]:
    """One row per (size, arm): accuracy on that size's loader, then latency; arms in eval meanwhile."""
    device = model_device(unwrap(next(iter(arms.values()))))
    rows: List[ScaleResult] = []
    with contextlib.ExitStack() as modes:
        for m in arms.values():
            modes.enter_context(run_mode(m))  # every module's flag restored after, not just the top one
        with Steps(len(sizes), "evaluate", progress) as steps, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UnknownSizeWarning)  # said in the notes
            for hw, loader in zip(sizes, loaders):
                results = _score(arms, loader, device)
                timing = [paired_latency_ms(arms, (b, channels, *hw), latency_repeats, device)
                          if latency_repeats > 0 else None for b in LATENCY_BATCHES]
                for arm in arms:
                    top1, top5, n = results[arm]
                    rows.append(ScaleResult(scale_key(hw), arm, round(top1, 2), round(top5, 2), n,
                                            *(None if t is None else round(t[arm], 4) for t in timing)))
                steps.advance(f"{scale_key(hw)}: " + ", ".join(
                    f"{arm} {results[arm][0]:.1f}%" for arm in arms))
    return rows


def _calibration_source(dataset: Any, images: PathLike, calibrate_images: Optional[PathLike],
                        config: Dict[str, Any], holdout: int, max_images: Optional[int], class_map: Any,
                        notes: List[str]) -> Tuple[Tuple[Any, List[int]], List[int]]:
    """((dataset, indices) to calibrate on, indices of ``dataset`` to score)."""
    if calibrate_images is not None:
        source = image_dataset(calibrate_images, config)
        scored, _ = split_indices(len(dataset), 0, max_images)
        notes.append(f"calibrated on {len(source)} images of {calibrate_images}")
        return (source, list(range(len(source)))), scored
    take = min(holdout, len(dataset) // 2)
    if take < 1:
        raise ValueError(f"{images} holds {len(dataset)} image(s): too few to hold some out for calibration; "
                         "pass calibrate_images (--calibrate-images)")
    scored, held = split_indices(len(dataset), take, max_images)
    notes.append(f"calibrated on {take} images held out of {images} (a seeded draw), disjoint from the scored "
                 "images; pass --calibrate-images to calibrate on another folder")
    return (dataset, held), scored


def _calibrated(model: nn.Module, sizes: Sequence[HW], calibration_set: Tuple[Any, List[int]],
                config: Dict[str, Any], batch_size: int, workers: int, progress: bool) -> nn.Module:
    """A converted copy of ``model`` with each branch calibrated on images preprocessed at its size."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=OneScaleWarning)  # one size: still a calibration
        converted = convert(copy.deepcopy(model), list(sizes))
    dataset, indices = calibration_set
    batches = math.ceil(len(indices) / batch_size)
    with Steps(len(sizes), "calibrate", progress) as steps:
        for hw in sizes:
            loader = loader_at(dataset, indices, config, hw, batch_size, workers)
            calibrate(converted, loader, num_batches=batches, scales=[hw], progress=False)
            steps.advance(scale_key(hw))
    return converted
