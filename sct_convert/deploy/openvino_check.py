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


def openvino_problem(path: Path, probes: Sequence[Tuple[Scale, torch.Tensor]], int8: bool = False) -> Optional[str]:
    """``None`` when OpenVINO runs ``path`` at every probe and agrees with onnxruntime, else one
    line saying where and how it does not. Call only with OpenVINO installed."""
    session = open_session(path, quiet=True)
    name = session.get_inputs()[0].name
    where = "loading it"
    try:
        compiled = compiled_on_cpu(path)
        for scale, x in probes:
            where = f"scale {scale_key(scale)}"
            feed = x.detach().cpu().numpy()
            want = session.run(None, {name: feed})
            got = compiled({name: feed})
            for i, expected in enumerate(want):
                answer = np.asarray(got[compiled.output(i)])
                if answer.shape != expected.shape:
                    return f"OpenVINO answers {where} with shape {answer.shape}, onnxruntime {expected.shape}"
                if int8 and expected.ndim == 2:  # logits: the same top-1
                    if (answer.argmax(1) != expected.argmax(1)).mean() > 0.5:
                        return f"OpenVINO's int8 top-1 at {where} disagrees with onnxruntime's on most images"
                elif not int8:
                    gap = float(np.abs(answer - expected).max()) if expected.size else 0.0
                    if gap > FLOAT_TOLERANCE * max(1.0, float(np.abs(expected).max())):
                        return f"OpenVINO's answer at {where} differs from onnxruntime's by {gap:.2g}"
    except Exception as e:  # noqa: BLE001 - any failure of the second runtime is reported, not raised
        return f"OpenVINO cannot run it ({where}): {_reason(e)}"
    return None
