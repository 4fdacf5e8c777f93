"""Small helpers the benchmark scripts share (not part of the package)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


ALLOCATOR_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_CONF")


def allocator() -> str:
    """The host allocator in use and its settings: CPU timings of big activations depend on
    them (whether freed activations go back to the kernel and page-fault in again)."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "unknown"
    name = next((n for n in ("jemalloc", "tcmalloc", "mimalloc") if n in maps), "glibc malloc")
    settings = [f"{k}={os.environ[k]}" for k in ALLOCATOR_SETTINGS if k in os.environ]
    return " ".join([name] + settings)


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
