"""Checkpoint files: the combined multi-scale file and plain per-scale exports, as safetensors.

Every write goes to a temporary file in the target directory and is renamed into place, so a
failure never leaves a half-written file nor clobbers an existing one. Nothing is unpickled.
What a file records is :mod:`sct_convert.checkpoints.format`; how weights go into a model is
:mod:`sct_convert.checkpoints.weights`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from torch import nn

from ..core.scales import Scale, is_branched, normalize_scale, scale_key, scales_to_json, split_branch_key
from .._utils.progress import Steps
from .._utils.files import PathLike, atomic_save, atomic_save_model, writable_directory
from ..errors import FileFormatError
from ..metadata_fields import CHECKPOINT_FIELDS, check_fields
from .format import (FORMAT, PLAIN_FORMAT, base_metadata, read_tensors, tensor_shapes, checked_metadata, file_scales, versions_of,
                       read_metadata)
from .weights import load_state_dict_strict
from ..conversion.rewrite import convert_in_order
from ..core.model import context_of, is_converted, scale_specific_layers, unwrap
from .zoo import arch_info, create_model
from ..core.context import record_origin

if TYPE_CHECKING:
    from ..serving.cascade import Cascade

_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}


def plain_state_dict(model: nn.Module, s: Scale) -> Dict[str, torch.Tensor]:
    """Branch ``s``'s view of the model: exactly the original model's ``state_dict`` keys."""
    model = unwrap(model)
    ctx = context_of(model)
    key = scale_key(ctx.sizes[ctx.index(s)])
    layers = {name for name, _ in scale_specific_layers(model)}
    out: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        parts = split_branch_key(k)
        if parts is not None and parts[0] in layers:
            if parts[1] == key:
                out[f"{parts[0]}.{parts[2]}"] = v
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
        model: a converted model (DDP / DataParallel wrappers are unwrapped), or a
            :class:`~sct_convert.Cascade` over one: its stages and thresholds go into the metadata
            too, and :func:`load_cascade` gives it back.
        path: the ``.safetensors`` file to write, atomically.
        arch: architecture name recorded in the metadata (default: detected when created by timm
            or torchvision).
        source: ``"timm"`` or ``"torchvision"`` (default: detected).

    Returns:
        The path written.
    """
    from ..serving.cascade import Cascade

    extra = model.metadata() if isinstance(model, Cascade) else {}
    model = unwrap(model.model if isinstance(model, Cascade) else model)  # DDP / DataParallel: no "module."
    ctx = context_of(model)
    meta = base_metadata(model, arch, source)
    meta.update(extra)
    meta.update(
        format=FORMAT,
        scales=scales_to_json(ctx.scales),
        unknown_scale=ctx.unknown_scale,
        scale_specific_bn="1" if ctx.scale_specific_bn else "0",
        layers=str(sum(1 for _ in scale_specific_layers(model))),
    )
    return atomic_save_model(model, path, meta)


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
    meta = base_metadata(model, arch, source)
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
    directory = writable_directory(directory, "per-scale checkpoints")
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


def load_cascade(path: PathLike, model: Optional[nn.Module] = None, map_location: str = "cpu") -> "Cascade":
    """The :class:`~sct_convert.Cascade` that ``sct.save(cascade, path)`` wrote, model and thresholds.

    Args:
        path: a file written by :func:`save` from a cascade.
        model: the architecture to load into, as for :func:`load`.
        map_location: the device the weights are loaded to.

    Returns:
        The cascade, in eval mode. ``ValueError`` when the file records no cascade.
    """
    from ..serving.cascade import cascade_from_metadata

    meta = checked_metadata(path)
    if "cascade" not in meta:
        raise ValueError(f"{path} records no cascade: fit one with sct.fit_cascade (or sct-convert cascade) "
                         "and save it with sct.save(cascade, path); sct.load(path) gives the model")
    return cascade_from_metadata(load(path, model=model, map_location=map_location).eval(), meta, path).eval()


def _shape_mismatch(arch: str, source: str, kwargs: Dict[str, int],
                    shapes: Dict[str, tuple]) -> Optional[Tuple[str, tuple]]:
    """The first tensor ``(key, shape)`` of the model the metadata describes whose shape differs
    from the file's (``None`` when all shared keys agree)."""
    with torch.device("meta"):  # no memory: a hostile num_classes must not allocate gigabytes
        built, _ = create_model(arch, source, **kwargs)
    for key, value in built.state_dict().items():
        if key in shapes and tuple(value.shape) != shapes[key]:
            return key, tuple(value.shape)
    return None


def _check_against_tensors(path: PathLike, arch: str, source: str, kwargs: Dict[str, int],
                           shapes: Dict[str, tuple]) -> None:
    """Refuse metadata (``arch``, ``num_classes``, ``in_chans``) that disagrees with the file's own
    tensor shapes before the model is built for real, naming the field at fault."""
    try:
        found = _shape_mismatch(arch, source, kwargs, shapes)
    except ValueError as e:  # the zoo's "unknown model" (with close matches), or arguments it refuses
        raise FileFormatError(f"{path}: metadata field 'arch' names a model {source} cannot build: {e}",
                              path=path, field="arch") from None
    if found is None:
        return
    key, shape = found
    what = f"{key} is {shape} in {arch} built with {kwargs}, {shapes[key]} in the file"
    for field in ("num_classes", "in_chans"):  # the field that tensor's shape follows is at fault
        if field in kwargs:
            moved = _shape_mismatch(arch, source, {**kwargs, field: kwargs[field] + 1}, {key: shapes[key]})
            if moved is not None and moved[1] != shape:
                raise FileFormatError(f"{path}: metadata field {field!r} ({kwargs[field]}) disagrees with the "
                                      f"file's tensors ({what}): the metadata is damaged", path=path, field=field)
    raise FileFormatError(f"{path}: metadata field 'arch' ({arch!r}) does not describe the file's tensors "
                          f"({what}): the metadata is damaged, or pass the model: sct.load(path, model=my_net)",
                          path=path, field="arch")


def load(path: PathLike, model: Optional[nn.Module] = None, map_location: str = "cpu") -> nn.Module:
    """Rebuild a converted model from :func:`save`'s file, offline.

    Args:
        path: a file written by :func:`save` (or ``sct-convert``).
        model: the architecture to load into (converted or not), for custom models; by default
            the timm / torchvision architecture named in the file is built with random init.
        map_location: the device the weights are loaded to.

    Returns:
        The converted model with every branch's weights. Raises :class:`FileFormatError` (a
        ``ValueError``) naming the field when the file is not a converted checkpoint or names no
        architecture this function can build without ``model``, and
        :class:`WeightsMismatchError` when it does not match ``model``.
    """
    meta = checked_metadata(path)
    fields = check_fields(meta, path, CHECKPOINT_FIELDS)
    scales = fields["scales"]
    shapes = tensor_shapes(path)
    shared = meta.get("scale_specific_bn", "1") == "0"
    if is_branched(shapes) == shared and (shared or (fields.get("layers") or 0) > 0):
        raise FileFormatError(f"{path}: metadata field 'scale_specific_bn' says {'shared' if shared else 'per-scale'} "
                              f"BatchNorm, but the file's tensors are {'per-scale' if shared else 'shared'}: "
                              "the metadata is damaged", path=path, field="scale_specific_bn")
    if model is None:
        arch, source = meta.get("arch"), meta.get("source")
        if not arch or source not in ("timm", "torchvision"):
            # a custom model's file is not damaged, but the field that stops a rebuild is named all the same
            raise FileFormatError(
                f"{path} records no timm/torchvision architecture (arch={arch!r}, "
                f"source={source!r}); pass the model: sct.load(path, model=my_net)",
                path=path, field="arch" if not arch else "source",
            )
        kwargs = {}
        if fields.get("num_classes"):
            kwargs["num_classes"] = fields["num_classes"]
        if source == "timm" and fields.get("in_chans"):
            kwargs["in_chans"] = fields["in_chans"]
        if source == "torchvision" and meta.get("aux_loss") == "1":
            kwargs["aux_loss"] = True
        _check_against_tensors(path, arch, source, kwargs, shapes)
        model, _ = create_model(arch, source, **kwargs)
        if source == "torchvision":
            record_origin(model, arch, source)
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
    load_state_dict_strict(model, read_tensors(path, map_location), path)
    layers = sum(1 for _ in scale_specific_layers(model))  # the tensors fit: this is the true count
    if fields.get("layers") is not None and fields["layers"] != layers:
        raise FileFormatError(f"{path}: metadata field 'layers' says {fields['layers']} scale-specific layers, "
                              f"but the file's tensors hold {layers}: the metadata is damaged",
                              path=path, field="layers")
    return model



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
    load_state_dict_strict(model, read_tensors(path), path)
    return model


def describe(path: PathLike) -> Dict[str, object]:
    """What ``sct-convert inspect`` prints: architecture, scales and the cost of each scale."""
    meta = checked_metadata(path)
    scales = file_scales(meta, path)
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
            parts = split_branch_key(k)
            if parts is not None:
                if parts[1] == first:
                    layers.add(parts[0])
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
        "versions": versions_of(meta, path),
    }


__all__ = ["describe", "export", "load", "load_plain", "plain_state_dict", "save", "save_per_scale"]
