"""What sct-convert files record about a model, and reading it back.

Every file (combined checkpoint, per-scale checkpoint, ONNX, ``.pt2``) carries string
metadata (safetensors' ``Dict[str, str]``): the format and its version, the architecture and
its library, the scales, routing policy, class count, input channels and layout, and the
versions that wrote it. Reading a file that is corrupt, foreign or newer is a
:class:`FileFormatError` (a ``ValueError``) that says which.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torchvision.models.detection.ssd import SSDClassificationHead
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

from .._utils.files import PathLike
from ..errors import FileFormatError
from ..core.model import context_of, is_converted
from ..core.scales import Scale
from ..metadata_fields import CHECKPOINT_FIELDS, INPUT_LAYOUTS, check_fields, read_scales, read_versions
from .zoo import arch_info



FORMAT = "sct-convert"
PLAIN_FORMAT = "sct-convert/plain"
FORMAT_VERSION = "1"


def versions_json() -> str:
    """The versions that write a file (sct-convert, torch, torchvision, timm), as JSON: every file's ``versions`` field."""
    import timm
    import torchvision

    from .._version import __version__

    return json.dumps(
        {"sct_convert": __version__, "torch": torch.__version__,
         "torchvision": torchvision.__version__, "timm": timm.__version__}
    )


def num_classes_of(model: nn.Module) -> Optional[int]:
    """How many classes ``model`` predicts, where its head tells (classifier, detection or segmentation head)."""
    for m in model.modules():  # the model (timm), or a detection head (RetinaNet, FCOS, SSD)
        n = getattr(m, "num_classes", None)
        if not isinstance(n, int) and isinstance(m, (SSDClassificationHead, SSDLiteClassificationHead)):
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
    n = num_classes_of(model)
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
        return INPUT_LAYOUTS[2]
    return INPUT_LAYOUTS[1] if len(ctx.probe_lead) == 3 else INPUT_LAYOUTS[0]


def base_metadata(model: nn.Module, arch: Optional[str], source: Optional[str]) -> Dict[str, str]:
    return {"format_version": FORMAT_VERSION, **model_metadata(model, arch, source), "versions": versions_json()}




def read_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file; ``ValueError`` for a corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise FileFormatError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}", path=path
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
        raise FileFormatError(
            f"{path} was not written by sct.save (no sct-convert metadata); for plain weights "
            "use sct-convert MODEL --checkpoint FILE", path=path, field="format"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(
            f"{path} has sct-convert format version {meta.get('format_version')!r}; this "
            f"version reads {FORMAT_VERSION}: upgrade sct-convert", path=path, field="format_version"
        )
    check_fields(meta, path, CHECKPOINT_FIELDS)  # every field it holds, or the first one at fault
    return meta


def file_scales(meta: Dict[str, str], path: PathLike = "the file") -> List[Scale]:
    """The scales a combined file's metadata records, in the file's order."""
    return read_scales(meta, path)


def versions_of(meta: Dict[str, str], path: PathLike = "the file") -> Dict[str, str]:
    """Inverse of :func:`versions_json` on a file's metadata (``{}`` where it records none)."""
    return read_versions(meta, path)


def tensor_shapes(path: PathLike) -> Dict[str, Tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header, without reading the data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise FileFormatError(f"{path}: the tensors cannot be read (truncated or corrupt?): {e}", path=path) from None


def read_tensors(path: PathLike, map_location: str = "cpu") -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; :class:`~sct_convert.FileFormatError` for a damaged one."""
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as e:  # its header read, its data cut short or out of bounds
        raise FileFormatError(f"{path}: the tensors cannot be read (truncated or corrupt?): {e}", path=path) from None
