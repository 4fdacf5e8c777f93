"""The ``sct-convert`` command line (click). ``main`` is the console script's entry point."""
from .commands import cli, main

__all__ = ["cli", "main"]
