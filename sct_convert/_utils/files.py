"""Writing files atomically: a temporary file in the target's directory, renamed into place.

A failure never leaves a half-written file nor clobbers an existing one; an unwritable target
is a ``ValueError`` that names it. Used for every checkpoint (:mod:`sct_convert.checkpoints.files`) and
deployment file (:mod:`sct_convert.deploy.api`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from safetensors.torch import save_file, save_model
from torch import nn

PathLike = Union[str, os.PathLike]


def _umask_from_proc() -> Optional[int]:
    """The process's umask as Linux reports it (``/proc/self/status``), or None where it does not."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:  # no /proc (macOS, Windows)
        pass
    return None


def _umask_at_import() -> int:
    # os.umask can only be read by setting it, and it is process-wide: set while another thread
    # creates a file, that file would get the wrong mode. So it is read this way once, at import.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _umask_at_import() if _umask_from_proc() is None else None


def current_umask() -> int:
    """The umask new files get, read without changing it (at import where the OS cannot tell)."""
    umask = _umask_from_proc()
    return umask if umask is not None else _UMASK_AT_IMPORT


def saveable(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous tensors, a tensor that shares storage with an earlier one copied.

    Only for plain per-scale files, whose contract is exactly the original ``state_dict`` keys
    (a strict ``load_state_dict`` of ``load_file``'s dict); a whole model is written with
    safetensors' own rule for tied tensors instead (:func:`atomic_save_model`)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach()
        ptr = (v.device, v.untyped_storage().data_ptr()) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v.contiguous()
    return out


def writable_file(path: PathLike) -> Path:
    """``path`` as a ``Path``; ``ValueError`` if it is a directory or its directory is missing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def writable_directory(path: PathLike, what: str = "files") -> Path:
    """``path`` as a ``Path``; ``ValueError`` unless it is, or can be created as, a writable
    directory (checked before anything is written, so a bad target changes nothing)."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {what} to {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"cannot write {what} to {path}: {parent} is not writable")
            break
    return path


def existing_directory(path: PathLike, what: str) -> Path:
    """``path`` as a ``Path``; ``ValueError`` naming ``what`` (an option, e.g. ``--images``)
    unless it is an existing directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{what} {path} is not a directory" if path.exists() else
                         f"{what} {path} does not exist")
    return path


def _not_writable(path: Path, e: OSError) -> ValueError:
    return ValueError(f"cannot write {path}: {path.parent} is not writable ({e.strerror})")


def staging_directory(path: PathLike) -> tempfile.TemporaryDirectory:
    """A temporary directory beside ``path`` for files written before the rename that publishes
    them (same file system, so the rename is atomic); ``ValueError`` if ``path`` cannot be written."""
    path = writable_file(path)
    try:
        return tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise _not_writable(path, e) from None


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` to a temp file beside ``path``, then rename; ``ValueError`` if it cannot be written.

    A failure never leaves a half-written file nor clobbers an existing one.
    """
    path = writable_file(path)
    try:
        # the target's extension last: writers such as torch.export.save check it
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as e:
        raise _not_writable(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0o600
        os.replace(tmp, path)
    except BaseException as e:  # noqa: BLE001 - Ctrl-C too: the temp file goes, the error is re-raised
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


def atomic_save_model(model: nn.Module, path: PathLike, metadata: Dict[str, str]) -> Path:
    """Write ``model``'s state as safetensors (``safetensors.torch.save_model``: tensors the model
    ties together are stored once) via a temp file and rename; ``ValueError`` if it cannot be written."""
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata, force_contiguous=True))


def atomic_save(tensors: Dict[str, torch.Tensor], path: PathLike, metadata: Dict[str, str]) -> Path:
    """Write a safetensors file via a temp file and rename; ``ValueError`` if it cannot be written."""
    return atomic_write(path, lambda tmp: save_file(saveable(tensors), tmp, metadata=metadata))


