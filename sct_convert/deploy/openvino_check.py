"""The second runtime: does OpenVINO run an exported file, and give onnxruntime's answer?

An export is checked in onnxruntime before it is written (a file that fails there is refused).
When OpenVINO is installed (the ``[openvino]`` extra) it is checked there too, on the same
inputs, at ``f32`` inference precision (the CPU plugin's default on bf16-capable CPUs differs by
~1e-3); a file OpenVINO cannot run, or answers differently, is still written (onnxruntime runs
it) and the export says so in one line, naming what works. Int8 files are compared by their
top-1 rather than to 1e-4: the two runtimes' int8 kernels round differently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.scales import Scale, scale_key
from ..runtime import open_session

#: OpenVINO's answer counts as onnxruntime's within this much, relative to the largest output.
FLOAT_TOLERANCE = 1e-4


def openvino_version() -> Optional[str]:
    """The installed OpenVINO's version, ``None`` when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version().split("-")[0]


def compiled_on_cpu(path: Path) -> Any:
    import openvino

    return openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().startswith("[")]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _problem_at(compiled: Any, session: Any, name: str, x: torch.Tensor, where: str, int8: bool) -> Optional[str]:
    feed = x.detach().cpu().numpy()
    want = session.run(None, {name: feed})
    try:
        got = compiled({name: feed})
    except Exception as e:  # noqa: BLE001 - any failure of the second runtime is reported, not raised
        return f"cannot run it at {where}: {_reason(e)}"
    for i, expected in enumerate(want):
        answer = np.asarray(got[compiled.output(i)])
        if answer.shape != expected.shape:
            return f"answers {where} with shape {answer.shape}, onnxruntime {expected.shape}"
        if int8 and expected.ndim == 2:  # logits: the same top-1 (int8 kernels round differently)
            if (answer.argmax(1) != expected.argmax(1)).mean() > 0.5:
                return f"disagrees with onnxruntime's int8 top-1 at {where} on most images"
        elif not int8:
            gap = float(np.abs(answer - expected).max()) if expected.size else 0.0
            if gap > FLOAT_TOLERANCE * max(1.0, float(np.abs(expected).max())):
                return f"differs from onnxruntime at {where} by {gap:.2g}"
    return None


def openvino_problem(path: Path, probes: Sequence[Tuple[Scale, torch.Tensor]], int8: bool = False) -> Optional[str]:
    """``None`` when OpenVINO runs ``path`` at every probe and agrees with onnxruntime, else one
    line saying where and how it does not, and where it does. Call only with OpenVINO installed."""
    session = open_session(path, quiet=True)
    name = session.get_inputs()[0].name
    version = f"OpenVINO {openvino_version()}"
    try:
        compiled = compiled_on_cpu(path)
    except Exception as e:  # noqa: BLE001 - any failure of the second runtime is reported, not raised
        return f"{version} cannot load it: {_reason(e)}"
    problems, fine = [], []
    for scale, x in probes:
        where = f"scale {scale_key(scale)}"
        problem = _problem_at(compiled, session, name, x, where, int8)
        (fine if problem is None else problems).append(where if problem is None else problem)
    if not problems:
        return None
    works = f"; it matches onnxruntime at {', '.join(fine)}" if fine else ""
    return f"{version} {'; '.join(problems)}{works}"
