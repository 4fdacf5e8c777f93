"""Train / eval mode held for a block and restored module by module after it."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def run_mode(model: nn.Module, training: bool = False) -> Iterator[None]:
    """Eval (or with ``training``, train) mode inside the block; every module's flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
