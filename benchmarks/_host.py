"""Small helpers the benchmark scripts share (not part of the package)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def allocator() -> str:
    """The host allocator in use: CPU timings of big activations depend on it (page faults)."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "unknown"
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if name in maps), "glibc malloc")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` via a temp file in the same folder and rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
