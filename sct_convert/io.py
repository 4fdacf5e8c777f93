"""Checkpoints as safetensors: the combined multi-scale file and plain per-scale exports.

Every write goes to a temporary file in the target directory and is renamed into place, so a
failure never leaves a half-written file nor clobbers an existing one. Nothing is unpickled:
safetensors on load, ``torch.load(weights_only=True)`` for ``.pth`` weights.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .scales import Scale, normalize_scale, scale_key
from .progress import Steps
from .files import atomic_save
from .conversion import convert_in_order
from .converted import context_of, is_converted, scale_specific_layers, unwrap
from .zoo import arch_info, create_model

PathLike = Union[str, os.PathLike]

FORMAT = "sct-convert"
PLAIN_FORMAT = "sct-convert/plain"
FORMAT_VERSION = "1"
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}


def _versions() -> str:
    import timm
    import torchvision

    from . import __version__

    return json.dumps(
        {"sct_convert": __version__, "torch": torch.__version__,
         "torchvision": torchvision.__version__, "timm": timm.__version__}
    )


def _num_classes(model: nn.Module) -> Optional[int]:
    for m in model.modules():  # the model (timm), or a detection head (RetinaNet, FCOS, SSD)
        n = getattr(m, "num_classes", None)
        if not isinstance(n, int) and type(m).__name__.endswith("ClassificationHead"):
            n = getattr(m, "num_columns", None)  # torchvision's SSD heads
        if isinstance(n, int):
            return n
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)  # R-CNN
    if isinstance(getattr(predictor, "cls_score", None), nn.Linear):
        return predictor.cls_score.out_features
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is not None:
        return last.out_features
    head = getattr(model, "classifier", None)  # torchvision segmentation: a 1x1 conv per class
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)] if isinstance(head, nn.Module) else []
    return convs[-1].out_channels if convs else None


def _in_chans(model: nn.Module) -> Optional[int]:
    # the channels convert's probe ran with: timm's pretrained_cfg keeps saying 3 after in_chans=1
    lead = context_of(model).probe_lead
    return int(lead[1]) if len(lead) > 1 else None


def model_metadata(model: nn.Module, arch: Optional[str] = None, source: Optional[str] = None) -> Dict[str, str]:
    """What every file (checkpoint, ONNX, ``.pt2``) records of the model: ``arch``, ``source``,
    and, when known, ``num_classes``, ``in_chans`` and ``aux_loss`` (torchvision segmentation)."""
    info = arch_info(model)
    meta = {
        "arch": arch or info.get("arch", ""),
        "source": source or (info.get("source", "") if not arch else "") or "custom",
    }
    n = _num_classes(model)
    if n is not None:
        meta["num_classes"] = str(n)
    c = _in_chans(model)
    if c is not None:
        meta["in_chans"] = str(c)
    if getattr(model, "aux_classifier", None) is not None:  # torchvision segmentation's aux head
        meta["aux_loss"] = "1"
    layout = _input_layout(model)
    if layout:
        meta["input_layout"] = layout
    return meta


def _input_layout(model: nn.Module) -> str:
    """What the model is called with, as text: ``(N, C, H, W)``, ``(N, C, T, H, W)`` for clips, or
    a list of ``(C, H, W)`` images for a model that resizes its own input (a detector)."""
    if not is_converted(model):
        return ""
    ctx = context_of(model)
    if ctx.resizer:
        return "list of (C, H, W) images"
    return "(N, C, T, H, W)" if len(ctx.probe_lead) == 3 else "(N, C, H, W)"


def _base_metadata(model: nn.Module, arch: Optional[str], source: Optional[str]) -> Dict[str, str]:
    return {"format_version": FORMAT_VERSION, **model_metadata(model, arch, source), "versions": _versions()}


def plain_state_dict(model: nn.Module, s: Scale) -> Dict[str, torch.Tensor]:
    """Branch ``s``'s view of the model: exactly the original model's ``state_dict`` keys."""
    model = unwrap(model)
    ctx = context_of(model)
    key = scale_key(ctx.sizes[ctx.index(s)])
    layers = [name for name, _ in scale_specific_layers(model)]
    out: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        for name in layers:
            prefix = f"{name}.branches."
            if k.startswith(prefix):
                branch, _, rest = k[len(prefix):].partition(".")
                if branch == key:
                    out[f"{name}.{rest}"] = v
                break
        else:
            out[k] = v
    return out


def save(
    model: nn.Module,
    path: PathLike,
    *,
    arch: Optional[str] = None,
    source: Optional[str] = None,
) -> Path:
    """Write every branch of a converted model plus the metadata :func:`load` rebuilds it from.

    Args:
        model: a converted model (DDP / DataParallel wrappers are unwrapped).
        path: the ``.safetensors`` file to write, atomically.
        arch: architecture name recorded in the metadata (default: detected when created by timm
            or torchvision).
        source: ``"timm"`` or ``"torchvision"`` (default: detected).

    Returns:
        The path written.
    """
    model = unwrap(model)  # DDP / DataParallel: the keys :func:`load` expects, no "module."
    ctx = context_of(model)
    meta = _base_metadata(model, arch, source)
    meta.update(
        format=FORMAT,
        scales=json.dumps([list(s) if isinstance(s, tuple) else s for s in ctx.scales]),
        unknown_scale=ctx.unknown_scale,
        scale_specific_bn="1" if ctx.scale_specific_bn else "0",
        layers=str(sum(1 for _ in scale_specific_layers(model))),
    )
    return atomic_save(model.state_dict(), path, meta)


def export(
    model: nn.Module, s: Scale, path: PathLike, *, arch: Optional[str] = None,
    source: Optional[str] = None,
) -> Path:
    """Write scale ``s`` as a plain checkpoint that loads strictly into the unmodified model.

    Args:
        model: a converted model (DDP / DataParallel wrappers are unwrapped).
        s: the scale to write.
        path: the ``.safetensors`` file to write, atomically.
        arch: architecture name recorded in the metadata (default: the timm / torchvision name
            the model was created as, when known).
        source: ``"timm"`` or ``"torchvision"`` (default: detected).

    Returns:
        The path written. ``sct.load_plain(timm.create_model(arch), path)`` reads it back.
    """
    model = unwrap(model)
    ctx = context_of(model)
    meta = _base_metadata(model, arch, source)
    meta.update(format=PLAIN_FORMAT, scale=scale_key(ctx.sizes[ctx.index(s)]))
    return atomic_save(plain_state_dict(model, s), path, meta)


def save_per_scale(
    model: nn.Module, directory: PathLike, *, arch: Optional[str] = None,
    source: Optional[str] = None, progress: bool = False,
) -> List[Path]:
    """One plain checkpoint per scale in ``directory``, named ``<arch>_<scale>.safetensors``.

    Args:
        model: a converted model.
        directory: where to write (created if missing).
        arch: architecture name for the file names and metadata (default: detected).
        source: ``"timm"`` or ``"torchvision"`` (default: detected).
        progress: report each file (a bar on a terminal, one line on stderr otherwise).

    Returns:
        The paths written, one per scale, in the model's scale order.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot write per-scale checkpoints to {directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    name = arch or arch_info(model).get("arch") or type(model).__name__.lower()
    ctx = context_of(model)
    paths = []
    with Steps(len(ctx.scales), "per-scale files", progress) as steps:
        for s, hw in zip(ctx.scales, ctx.sizes):
            paths.append(export(model, s, directory / f"{name}_{scale_key(hw)}.safetensors", arch=arch, source=source))
            steps.advance(paths[-1].name)
    return paths


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file; ``ValueError`` for a corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


def checked_metadata(path: PathLike) -> Dict[str, str]:
    """Metadata of a combined sct-convert file; ``ValueError`` for plain, foreign or newer files."""
    meta = read_metadata(path)
    fmt = meta.get("format")
    if fmt == PLAIN_FORMAT:
        raise ValueError(
            f"{path} is a per-scale plain checkpoint (scale {meta.get('scale')}); load it with "
            "model.load_state_dict(safetensors.torch.load_file(path)) into the original model"
        )
    if fmt != FORMAT:
        raise ValueError(
            f"{path} was not written by sct.save (no sct-convert metadata); for plain weights "
            "use sct-convert MODEL --checkpoint FILE"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has sct-convert format version {meta.get('format_version')!r}; this "
            f"version reads {FORMAT_VERSION}: upgrade sct-convert"
        )
    return meta


def file_scales(meta: Dict[str, str]) -> List[Scale]:
    return [tuple(s) if isinstance(s, list) else s for s in json.loads(meta["scales"])]


def load_state_dict_strict(model: nn.Module, state: Dict[str, torch.Tensor], path: PathLike) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that says what does not match."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:2]
        raise ValueError(
            f"{path} does not match {type(model).__name__}: {'; '.join(first) or e}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match {type(model).__name__}: "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:3]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:3]}"
        )


def load(path: PathLike, model: Optional[nn.Module] = None, map_location: str = "cpu") -> nn.Module:
    """Rebuild a converted model from :func:`save`'s file, offline.

    Args:
        path: a file written by :func:`save` (or ``sct-convert``).
        model: the architecture to load into (converted or not), for custom models; by default
            the timm / torchvision architecture named in the file is built with random init.
        map_location: the device the weights are loaded to.

    Returns:
        The converted model with every branch's weights. Raises ``ValueError`` when
        the file is not a converted checkpoint or does not match ``model``.
    """
    meta = checked_metadata(path)
    scales = file_scales(meta)
    if model is None:
        arch, source = meta.get("arch"), meta.get("source")
        if not arch or source not in ("timm", "torchvision"):
            raise ValueError(
                f"{path} records no timm/torchvision architecture (arch={arch!r}, "
                f"source={source!r}); pass the model: sct.load(path, model=my_net)"
            )
        kwargs = {}
        if meta.get("num_classes"):
            kwargs["num_classes"] = int(meta["num_classes"])
        if source == "timm" and meta.get("in_chans"):
            kwargs["in_chans"] = int(meta["in_chans"])
        if source == "torchvision" and meta.get("aux_loss") == "1":
            kwargs["aux_loss"] = True
        model, _ = create_model(arch, source, **kwargs)
        if source == "torchvision":
            model.sct_arch = {"arch": arch, "source": source}
    if not is_converted(model):
        model = convert_in_order(model, scales, meta.get("unknown_scale", "nearest"),
                        scale_specific_bn=meta.get("scale_specific_bn", "1") == "1")
    else:
        ctx = context_of(model)
        if list(ctx.scales) != scales:
            raise ValueError(
                f"{path} holds scales {scales} but the model was converted with "
                f"{list(ctx.scales)}; pass an unconverted model"
            )
    state = load_file(str(path), device=map_location)
    load_state_dict_strict(model, with_module_metadata(state, model), path)
    return model


def with_module_metadata(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Attach ``model``'s per-module state-dict versions to a plain dict (safetensors drops them).

    A few loaders refuse a state dict without them (torchvision's MNASNet); this is what
    ``torch.save``/``torch.load`` would have kept.
    """
    out = collections.OrderedDict(state)
    out._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return out


def load_plain(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a per-scale checkpoint (or any plain safetensors weights) strictly into ``model``.

    Args:
        model: the unmodified architecture (not converted).
        path: a ``.safetensors`` file written by :func:`export` or :func:`save_per_scale`.

    Returns:
        ``model``, with the weights loaded. Raises ``ValueError`` naming missing or unexpected
        keys.
    """
    read_metadata(path)
    state = with_module_metadata(load_file(str(path)), model)
    load_state_dict_strict(model, state, path)
    return model


def describe(path: PathLike) -> Dict[str, object]:
    """What ``sct-convert inspect`` prints: architecture, scales and the cost of each scale."""
    meta = checked_metadata(path)
    scales = file_scales(meta)
    first = scale_key(normalize_scale(scales[0]))
    layers, total, branch_params, branch_bytes = set(), 0, 0, 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            numel = 1
            for d in t.get_shape():
                numel *= d
            learnable = k.endswith(".weight") or k.endswith(".bias")
            total += numel if learnable else 0
            if ".branches." in k:
                prefix, _, rest = k.partition(".branches.")
                if rest.split(".")[0] == first:
                    layers.add(prefix)
                    branch_params += numel if learnable else 0
                    branch_bytes += numel * _DTYPE_BYTES.get(t.get_dtype(), 4)
    shared = total - branch_params * len(scales)
    return {
        "arch": meta.get("arch") or "(custom)",
        "source": meta.get("source"),
        "scales": scales,
        "unknown_scale": meta.get("unknown_scale"),
        "num_classes": meta.get("num_classes"),
        "layers": len(layers),
        "params_total": total,
        "params_per_extra_scale": branch_params,
        "bytes_per_extra_scale": branch_bytes,
        "overhead_per_extra_scale": branch_params / max(shared + branch_params, 1),
        "versions": json.loads(meta.get("versions", "{}")),
    }


__all__ = [
    "atomic_save", "checked_metadata", "describe", "export", "file_scales", "load", "load_plain",
    "plain_state_dict", "read_metadata", "save", "save_per_scale",
]
