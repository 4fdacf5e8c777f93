"""Weights from other tools' checkpoints: ``.safetensors`` or ``.pth`` state dicts (training
checkpoints and wrapper prefixes included), read without unpickling code, loaded strictly."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file
from torch import nn

from .files import PathLike
from .io import load_state_dict_strict, read_metadata, with_module_metadata


def read_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pth`` (weights only, never unpickling code).

    Training checkpoints are unwrapped: the ``state_dict`` / ``model`` / ``state_dict_ema``
    entry, and a ``module.`` prefix (DDP). timm's ``train.py`` stores its ``argparse.Namespace``
    of arguments beside the weights; that one harmless class is allowed, nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.suffix == ".safetensors":
        read_metadata(path)
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors come in many types
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it pickles {found.group(1)}" if found else "it holds objects other than tensors"
        raise ValueError(
            f"refusing to read {path}: it is not a plain weights file ({what}), and loading it could run "
            "code from the file. Re-save the weights with safetensors (safetensors.torch.save_file) "
            "or as a plain state dict"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def without_wrapper_prefix(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state`` with a prefix every key shares removed (a LightningModule's ``model.``), when the
    keys only match ``model`` without it; otherwise ``state`` unchanged."""
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
    return any(".branches." in k for k in state)


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load plain weights (``.safetensors`` or ``.pth``, never unpickling code) strictly.

    A ``.pth`` is read with ``weights_only=True``; wrappers are unwrapped (``state_dict``,
    ``model``, ``state_dict_ema`` entries, a ``module.`` prefix). This is how an already-trained
    model is loaded before :func:`convert` or :func:`calibrate`.

    Args:
        model: the unconverted architecture.
        path: the weights file.

    Returns:
        ``model``, with the weights loaded. Raises ``ValueError`` naming missing or unexpected keys,
        or what an unsafe pickle holds.
    """
    load_state_dict_strict(model, with_module_metadata(read_weights(path), model), path)
    return model
