"""The probe: can the model run at each scale, and which layer sees the input first?

``convert`` runs the model once per scale (eval, no grad, the caller's RNG and the model's
buffers untouched) with a forward pre-hook on every leaf-like module, recording the spatial size
each one sees. The model's *entry layer* is its first batch norm when that sees a distinct
size at every scale, else the first layer before it that does; its sizes are the table the
entry router (:mod:`sct_convert.core.rule`) looks calls up in.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..core.scales import HW, Scale, largest_index, model_device, model_dtype, smallest_index
from ..errors import ConversionError
from .._utils.modes import run_mode

def stem_conv(model: nn.Module) -> Optional[nn.Module]:
    """The conv the image reaches first: timm's ``pretrained_cfg["first_conv"]``, else the first conv."""
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if isinstance(name, str):
        try:
            named = model.get_submodule(name)
        except AttributeError:
            named = None
        if isinstance(named, nn.modules.conv._ConvNd):
            return named
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


#: Clip lengths a video model is probed with, shortest (cheapest) first; the first that runs is used.
PROBE_FRAMES = (4, 8, 16, 32)


def _channel_candidates(model: nn.Module, in_chans: Optional[int]) -> List[int]:
    """Image channel counts to probe with, most likely first.

    The stem conv's own ``in_channels`` comes before timm's ``pretrained_cfg["input_size"]``,
    which keeps saying 3 for a model created with ``in_chans=1``; the config and 3 follow for
    stems that reshape the image before their first conv (space-to-depth: 3 -> 48).
    """
    if in_chans is not None:
        return [in_chans]
    conv = stem_conv(model)
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    candidates = [conv.in_channels if conv is not None else None, int(size[0]) if size else None, 3]
    return list(dict.fromkeys(c for c in candidates if c is not None))


def probe_leads(model: nn.Module, in_chans: Optional[int],
                 example_input: Optional[torch.Tensor]) -> List[Tuple[int, ...]]:
    """Leading dims of probe inputs to try, (N, C) or (N, C, T) for 3-d convs; spatial dims appended."""
    if example_input is not None:
        return [tuple(example_input.shape[:-2])]
    channels = _channel_candidates(model, in_chans)
    if isinstance(stem_conv(model), (nn.Conv3d, nn.ConvTranspose3d)):  # a clip: (N, C, T, H, W)
        return [(1, c, t) for c in channels for t in PROBE_FRAMES]
    return [(1, c) for c in channels]


def first_lead_that_runs(model: nn.Module, leads: List[Tuple[int, ...]],
                          probe: Callable[[Tuple[int, ...]], object]) -> Tuple[Tuple[int, ...], object]:
    """``(lead, probe(lead))`` for the first lead the model accepts; else the first lead's error
    (for clips, saying which clip lengths were tried)."""
    errors: Dict[Tuple[int, ...], ConversionError] = {}
    for lead in leads:
        try:
            return lead, probe(lead)
        except ConversionError as e:
            errors[lead] = e
    frames = sorted({lead[2] for lead in leads if len(lead) == 3})
    if len(frames) > 1:  # the longest clip's error: a too-short clip is no longer the cause there
        longest = max((lead for lead in leads if lead[1] == leads[0][1]), key=lambda lead: lead[2])
        raise ConversionError(
            f"{errors[longest]}; clips of {', '.join(map(str, frames))} frames were tried and none ran: if "
            "the model needs another clip length, pass example_input=torch.randn(1, C, T, H, W) with one it accepts"
        ) from errors[longest]
    raise errors[leads[0]]


def describe_failure(e: BaseException) -> str:
    """``Type: first line of message (at file.py:line in fn)`` for the innermost frame."""
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = ""
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f" (at {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name})"
    return f"{type(e).__name__}: {msg}{where}" if msg else f"{type(e).__name__}{where}"


def out_of_memory(e: BaseException) -> bool:
    """The host ran out of memory: says nothing about whether the model accepts a size."""
    # torch's CPU allocator raises a plain RuntimeError (no error type of its own), so its text is all there is
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def _probe_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where and in what dtype a probe input goes: the model's."""
    return model_device(model), model_dtype(model)


@contextlib.contextmanager
def rng_kept(model: nn.Module) -> Iterator[None]:
    """Probe inputs are random; the caller's RNG streams (CPU and the model's GPU) stay as they were."""
    device, _ = _probe_device_dtype(model)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Every buffer (BN statistics, counters) holds its old value after the block."""
    saved = [(m, k, b, b.detach().clone()) for m in model.modules()
             for k, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, k, b, copy_of_b in saved:
                m._buffers[k] = b
                b.copy_(copy_of_b)


def training_failure(model: nn.Module, sizes: Sequence[HW], scales: Sequence[Scale],
                      lead: Tuple[int, ...], index: Optional[int] = None) -> Optional[str]:
    """A warning when the train-mode forward fails at scale ``index`` but runs at the largest.

    The eval probe cannot see train-only parts (torchvision Inception-v3's aux head needs a
    larger input than the main path). One no-grad, batch-2 forward at scale ``index`` (by
    default the smallest) finds them; the model's buffers and mode flags are left as they
    were. A failure at the largest other scale too is not about size (say, a model that
    wants targets in train mode), so it says nothing.
    """
    syncing = torch.distributed.is_available() and torch.distributed.is_initialized() and any(
        isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if len(sizes) < 2 or syncing:  # a train-mode SyncBN forward would start collectives
        return None
    device, dtype = _probe_device_dtype(model)
    probed = smallest_index(sizes) if index is None else index
    others = [i for i in range(len(sizes)) if i != probed]
    reference = others[largest_index([sizes[i] for i in others])]
    train_lead = (max(2, lead[0]),) + tuple(lead[1:])  # train-mode BN needs two samples

    def failure(i: int) -> Optional[BaseException]:
        x = torch.randn(*train_lead, *sizes[i], device=device, dtype=dtype)
        try:
            model(x)
        except Exception as e:  # noqa: BLE001 - reported as a warning below
            return e
        return None

    with run_mode(model, training=True), _buffers_kept(model), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model's own train-mode warnings are not ours
        failed = failure(probed)
        if failed is None or out_of_memory(failed) or failure(reference) is not None:
            return None
    shape = "x".join(map(str, (*train_lead, *sizes[probed])))
    return (
        f"scale {scales[probed]!r}: the model runs at this size in eval mode, but its "
        f"train-mode forward fails (input {shape}): {describe_failure(failed)}; SCT training "
        "with this scale will fail: drop the scale, or switch off the train-only part that "
        "fails (for torchvision Inception-v3, aux_logits=False)"
    )


class SizeLog:
    """Forward pre-hooks that record the (H, W) every leaf-like module sees, one record per
    probed scale, and the order modules are first reached before the first batch norm."""

    def __init__(self, model: nn.Module, batch_norms: Set[int]) -> None:
        self.batch_norms = batch_norms
        self.records: List[Dict[str, List[HW]]] = []
        self.order: List[str] = []  # modules reached before the first batch norm, first probe
        self._bn_called = False
        self._handles = [m.register_forward_pre_hook(self._hook(n, m))
                         for n, m in model.named_modules() if n]

    def _hook(self, name: str, module: nn.Module) -> Callable:
        leaf_like = id(module) in self.batch_norms or not any(True for _ in module.children())

        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not leaf_like or not isinstance(x, torch.Tensor) or x.dim() < 3:
                return
            self.records[-1].setdefault(name, []).append((int(x.shape[-2]), int(x.shape[-1])))
            if len(self.records) == 1 and not self._bn_called and name not in self.order:
                self.order.append(name)
            if id(_module) in self.batch_norms:
                self._bn_called = True

        return hook

    def next_scale(self) -> None:
        self.records.append({})
        self._bn_called = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def per_scale_sizes(self, name: str) -> Optional[List[HW]]:
        """``name``'s input size at each scale; ``None`` unless it is called once per forward
        (more calls would re-route mid-forward) and sees a distinct size at each scale."""
        calls = [record.get(name, []) for record in self.records]
        if any(len(c) != 1 for c in calls):
            return None
        sizes = [c[0] for c in calls]
        return sizes if len(set(sizes)) == len(sizes) else None


def run_at_every_scale(model: nn.Module, sizes: Sequence[HW], scales: Sequence[Scale],
                        lead: Tuple[int, ...], log: SizeLog) -> None:
    """One eval, no-grad forward per scale; a failure names the scale and the input."""
    device, dtype = _probe_device_dtype(model)
    with run_mode(model), torch.no_grad():
        for scale, (h, w) in zip(scales, sizes):
            log.next_scale()
            x = torch.randn(*lead, h, w, device=device, dtype=dtype)
            try:
                model(x)
            except Exception as e:  # noqa: BLE001 - reported with the scale that failed
                if out_of_memory(e):
                    raise  # not the architecture's verdict on this scale
                shape = "x".join(map(str, x.shape))
                raise ConversionError(
                    f"model cannot run at scale {scale!r} (input {shape}): "
                    f"{describe_failure(e)}; drop that scale or pick sizes the "
                    "architecture accepts (fixed-size models need their native size)"
                ) from e


def probe_entry(
    model: nn.Module, sizes: Sequence[HW], scales: Sequence[Scale], lead: Tuple[int, ...],
    batch_norms: Set[int], probed_sizes: Optional[Dict[str, Optional[List[HW]]]] = None,
    need_entry: bool = True,
) -> Tuple[str, List[HW]]:
    """Run the model at every scale; return the entry module's name and its input size per scale.

    ``probed_sizes``, if given, receives each batch norm's input size per scale (``None`` where
    it is called more than once per forward or sees the same size at two scales). Without
    ``need_entry`` the model only has to run: ``("", [])`` when no layer can route.
    """
    log = SizeLog(model, batch_norms)
    try:
        run_at_every_scale(model, sizes, scales, lead, log)
    finally:
        log.remove()
    names = {id(m): n for n, m in model.named_modules()}
    bn_names = {names[i] for i in batch_norms if i in names}
    # The first batch norm is the natural entry: its dispatch is already a traced leaf call.
    first_bn = next((n for n in log.order if n in bn_names), None)
    for name in ([first_bn] if first_bn else []) + log.order:
        entry_sizes = log.per_scale_sizes(name)
        if entry_sizes is not None:
            if probed_sizes is not None:
                probed_sizes.update({n: log.per_scale_sizes(n) for n in log.records[0] if n in bn_names})
            return name, entry_sizes
    if not need_entry:
        return "", []
    raise ConversionError(
        "cannot route by input size: no layer before the first batch norm sees a different "
        f"size at each of the scales {list(scales)}; use scales that differ more, or run each "
        "scale under sct.scale(model, s)"
    )
