"""Progress of long steps: a tqdm bar on a terminal, one line per step otherwise, or nothing."""
from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO


class Steps:
    """Counts the steps of one long job (a scale traced, a scale calibrated, a scale evaluated).

    On a terminal it draws a tqdm bar; when stderr is a file or a pipe (CI logs, ``nohup``) it
    writes one line per finished step, ``desc: 2/4 scale 192 (3.1 s)``, so logs stay readable.
    Disabled, it does nothing. Use as a context manager; :meth:`advance` after each step.

    Args:
        total: the number of steps.
        desc: what the job is ("export onnx", "evaluate").
        enabled: report at all.
        stream: where to report (default: ``sys.stderr``).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: Optional[TextIO] = None) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._bar: Any = None
        self._started = time.perf_counter()
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", file=self.stream, leave=True)

    def advance(self, label: str = "") -> None:
        """One step is done; ``label`` says which."""
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        print(f"{self.desc}: {self.done}/{self.total} {label} ({now - self._started:.1f} s)".replace("  ", " "),
              file=self.stream, flush=True)
        self._started = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
