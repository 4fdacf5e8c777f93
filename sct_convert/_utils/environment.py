"""What to tell a user to install: the command that works for how sct-convert was installed."""
from __future__ import annotations

from pathlib import Path


def source_checkout() -> "Path | None":
    """The clone sct-convert runs from (an editable install or the working tree), else None."""
    root = Path(__file__).resolve().parents[2]  # sct_convert/_utils/environment.py -> the clone
    setup = root / "setup.cfg"
    if setup.is_file() and "name = sct-convert" in setup.read_text(errors="replace"):
        return root
    return None


def install_command(extra: str) -> str:
    """``pip install`` of an optional extra: ``-e "<clone>[extra]"`` from a clone, else from PyPI.

    Args:
        extra: the extra's name in setup.cfg (``"onnx"``, ``"plot"``).

    Returns:
        A command line to paste.
    """
    root = source_checkout()
    if root is not None:
        target = '".[{}]"'.format(extra) if Path.cwd().resolve() == root else f'"{root}[{extra}]"'
        return f"pip install -e {target}"
    return f'pip install "sct-convert[{extra}]"'
