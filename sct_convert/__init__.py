"""sct-convert: Scale Calibrated Training for any timm / torchvision CNN, without source edits.

``sct.convert(model, scales=[224, 192, 128])`` gives every batch norm one branch per scale
(Scale-Specific BN) and routes each input to the branch of its size.

The public names below load on first use, so ``import sct_convert`` (and ``sct-convert --help``)
does not pay for importing torch, torchvision and timm until a name that needs them is used.
"""
import importlib
from typing import TYPE_CHECKING, Any, List

from ._version import __version__  # noqa: F401 - sct_convert.__version__

# public name -> the module that defines it
_SOURCES = {
    "ConversionError": "errors", "FileFormatError": "errors",
    "UnsafeCheckpointError": "errors", "WeightsMismatchError": "errors",
    "FROZEN_BATCH_NORM_TYPES": "core.batchnorm", "ScaleSpecificBatchNorm": "core.batchnorm",
    "is_batch_norm": "core.batchnorm",
    "ScaleContext": "core.context",
    "context_of": "core.model", "extract": "core.model", "original_class": "core.model",
    "route": "core.model", "scale": "core.model", "scale_specific_layers": "core.model",
    "scales_of": "core.model",
    "ScaleOutputs": "core.sampling", "resize_to": "core.sampling",
    "convert": "conversion.rewrite", "find_batch_norms": "conversion.discovery",
    "SCTLoss": "training.step", "StepResult": "training.step", "random_scale_subset": "training.step",
    "sampling_scales": "training.step", "set_sampling": "training.step", "train_step": "training.step",
    "add_scale": "training.calibration", "calibrate": "training.calibration",
    "remove_scale": "training.calibration",
    "Cascade": "serving.cascade", "CascadeReport": "serving.cascade",
    "CascadeResult": "serving.cascade", "fit_cascade": "serving.cascade",
    "DetectorBatch": "detection.split", "DetectorCore": "detection.split",
    "detector_core": "detection.split", "detector_postprocess": "detection.split",
    "detector_preprocess": "detection.split",
    "export": "checkpoints.files", "load": "checkpoints.files", "load_cascade": "checkpoints.files",
    "load_plain": "checkpoints.files", "save": "checkpoints.files",
    "save_per_scale": "checkpoints.files", "load_weights": "checkpoints.weights",
    "export_onnx": "deploy.api", "export_program": "deploy.api", "Int8": "deploy.int8",
    "EvaluationReport": "evaluation.report", "evaluate": "evaluation.run",
}
# public modules: sct.zoo (models by name), sct.diagnostics (branch statistics)
_MODULES = {"zoo": "checkpoints.zoo", "diagnostics": "training.diagnostics"}

__all__ = [
    "Cascade", "CascadeReport", "CascadeResult", "ConversionError", "DetectorBatch", "DetectorCore",
    "EvaluationReport", "FROZEN_BATCH_NORM_TYPES", "FileFormatError", "Int8", "UnsafeCheckpointError",
    "WeightsMismatchError", "SCTLoss", "ScaleContext", "ScaleOutputs",
    "ScaleSpecificBatchNorm", "StepResult", "add_scale", "calibrate", "context_of", "convert",
    "detector_core", "detector_postprocess", "detector_preprocess", "diagnostics", "evaluate",
    "export", "export_onnx", "export_program", "extract", "find_batch_norms", "fit_cascade",
    "is_batch_norm", "load", "load_cascade", "load_plain", "load_weights", "original_class",
    "random_scale_subset", "remove_scale", "resize_to", "route", "sampling_scales", "save",
    "save_per_scale", "scale", "scale_specific_layers", "scales_of", "set_sampling", "train_step",
    "zoo",
]


def __getattr__(name: str) -> Any:
    """PEP 562: a public name loads its submodule on first use, then is an ordinary attribute."""
    if name in _MODULES:
        value = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    elif name in _SOURCES:
        value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from .checkpoints import zoo
    from .checkpoints.files import export, load, load_cascade, load_plain, save, save_per_scale
    from .checkpoints.weights import load_weights
    from .conversion.discovery import find_batch_norms
    from .conversion.rewrite import convert
    from .core.batchnorm import FROZEN_BATCH_NORM_TYPES, ScaleSpecificBatchNorm, is_batch_norm
    from .core.context import ScaleContext
    from .errors import ConversionError, FileFormatError, UnsafeCheckpointError, WeightsMismatchError
    from .core.model import (context_of, extract, original_class, route, scale, scale_specific_layers,
                             scales_of)
    from .core.sampling import ScaleOutputs, resize_to
    from .deploy.api import export_onnx, export_program
    from .deploy.int8 import Int8
    from .detection.split import (DetectorBatch, DetectorCore, detector_core, detector_postprocess,
                                  detector_preprocess)
    from .evaluation.report import EvaluationReport
    from .evaluation.run import evaluate
    from .serving.cascade import Cascade, CascadeReport, CascadeResult, fit_cascade
    from .training import diagnostics
    from .training.calibration import add_scale, calibrate, remove_scale
    from .training.step import SCTLoss, StepResult, random_scale_subset, sampling_scales, set_sampling, train_step
