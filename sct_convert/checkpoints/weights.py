"""Weights into a model: one loading path for the API (``sct.load_weights``, ``sct.load``) and
the CLI (``--checkpoint``).

Weights come from ``.safetensors`` or ``.pth`` state dicts (training checkpoints and wrapper
prefixes included), are read without unpickling code and are loaded strictly: a mismatch is a
:class:`WeightsMismatchError` naming the keys or shapes that differ.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Dict, Iterable, List

import torch
from torch import nn

from .._utils.files import PathLike
from .format import read_metadata, read_tensors
from ..errors import UnsafeCheckpointError, WeightsMismatchError
from ..core.scales import is_branched

#: Entries of a training checkpoint that hold the weights (timm's train.py, torchvision's references).
CHECKPOINT_ENTRIES = ("state_dict", "model", "state_dict_ema")


def _unsafe_globals(path: Path) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, OSError):  # not a zip checkpoint (legacy or corrupt): nothing to name
        return []


def read_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pth`` (weights only, never unpickling code).

    Training checkpoints are unwrapped (the ``state_dict`` / ``model`` / ``state_dict_ema``
    entry). timm's ``train.py`` stores its ``argparse.Namespace`` of arguments beside the
    weights; that one harmless class is allowed, nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.suffix == ".safetensors":
        read_metadata(path)  # a corrupt header: a clear FileFormatError
        return read_tensors(path)
    unsafe = [g for g in _unsafe_globals(path) if g != "argparse.Namespace"]
    if unsafe:
        raise UnsafeCheckpointError(
            f"refusing to read {path}: it is not a plain weights file (it pickles {', '.join(unsafe[:3])}), "
            "and loading it could run code from the file. Re-save the weights with safetensors "
            "(safetensors.torch.save_file) or as a plain state dict")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only unpickling of any bytes: UnpicklingError, EOFError, RuntimeError, ...
        raise UnsafeCheckpointError(
            f"refusing to read {path}: torch.load(weights_only=True) cannot read it ({type(e).__name__}); "
            "re-save the weights with safetensors (safetensors.torch.save_file) or as a plain state dict"
        ) from None
    for key in CHECKPOINT_ENTRIES:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def without_wrapper_prefix(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state`` with a prefix every key shares removed (DDP's ``module.``, a LightningModule's
    ``model.``, ...), when the keys only match ``model`` without it; otherwise ``state`` unchanged."""
    expected = set(model.state_dict())
    if not state or set(state) & expected:
        return state
    firsts = {k.split(".", 1)[0] for k in state}
    if len(firsts) == 1 and all("." in k for k in state):
        prefix = firsts.pop() + "."
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if set(stripped) & expected:
            return stripped
    return state


def has_branches(state: Dict[str, torch.Tensor]) -> bool:
    """True for the state dict of a converted model (keys with ``.branches.<scale>.``)."""
    return is_branched(state)


def with_module_metadata(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Attach ``model``'s per-module state-dict versions to a plain dict (safetensors drops them).

    A few loaders refuse a state dict without them (torchvision's MNASNet); this is what
    ``torch.save``/``torch.load`` would have kept.
    """
    out = collections.OrderedDict(state)
    out._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return out


def _stored_once(expected: Dict[str, torch.Tensor], present: Iterable[str]) -> set:
    """Keys of ``expected`` that share storage with a key in ``present``: tensors tied in the model
    that safetensors stores once (``safetensors.torch.save_model``)."""
    present = set(present)
    owners = {(t.device, t.untyped_storage().data_ptr()) for k, t in expected.items() if k in present and t.numel()}
    return {k for k, t in expected.items()
            if k not in present and t.numel() and (t.device, t.untyped_storage().data_ptr()) in owners}


def load_state_dict_strict(model: nn.Module, state: Dict[str, torch.Tensor], path: PathLike) -> None:
    """Load ``state`` into ``model``: every key, every shape, or a :class:`WeightsMismatchError` that
    names what differs. Tied tensors stored once count as present."""
    expected = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise WeightsMismatchError(f"{path} does not match {type(model).__name__}: size mismatch for {'; '.join(wrong[:2])}")
    missing = [k for k in expected if k not in state and k not in _stored_once(expected, state)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{path} does not match {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    model.load_state_dict(with_module_metadata(state, model), strict=False)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: PathLike) -> nn.Module:
    """The one loading path: wrapper prefixes removed, then loaded strictly. ``path`` names the
    source in errors."""
    load_state_dict_strict(model, without_wrapper_prefix(state, model), path)
    return model


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load plain weights (``.safetensors`` or ``.pth``, never unpickling code) strictly.

    A ``.pth`` is read with ``weights_only=True``; training checkpoints are unwrapped
    (``state_dict``, ``model``, ``state_dict_ema`` entries) and a prefix every key shares is
    dropped when the keys only match without it (DDP's ``module.``, a LightningModule's
    ``model.``), exactly as ``sct-convert MODEL --checkpoint FILE`` does. This is how an
    already-trained model is loaded before :func:`convert` or :func:`calibrate`.

    Args:
        model: the unconverted architecture (or a converted one, for a converted model's
            training checkpoint).
        path: the weights file.

    Returns:
        ``model``, with the weights loaded. Raises :class:`WeightsMismatchError` (a ``ValueError``)
        naming missing, unexpected or mis-shaped keys, or :class:`UnsafeCheckpointError` naming
        what an unsafe pickle holds.
    """
    return load_state(model, read_weights(path), path)
