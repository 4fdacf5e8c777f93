"""sct-convert: Scale Calibrated Training for any timm / torchvision CNN, without source edits.

``sct.convert(model, scales=[224, 192, 128])`` gives every batch norm one branch per scale
(Scale-Specific BN) and routes each input to the branch of its size.

The public names below load on first use, so ``import sct_convert`` (and ``sct-convert --help``)
does not pay for importing torch, torchvision and timm until a name that needs them is used.
"""
import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

# public name -> the submodule that defines it (a submodule itself where the name is the module)
_SOURCES = {
    "FROZEN_BATCH_NORM_TYPES": "bn", "ScaleSpecificBatchNorm": "bn", "is_batch_norm": "bn",
    "ScaleContext": "context",
    "ConversionError": "discovery", "context_of": "converted", "convert": "conversion", "extract": "converted",
    "find_batch_norms": "discovery", "original_class": "converted", "route": "converted", "scale": "converted",
    "scale_specific_layers": "converted", "scales_of": "converted",
    "ScaleOutputs": "sampling", "resize_to": "sampling",
    "SCTLoss": "training", "StepResult": "training", "random_scale_subset": "training",
    "sampling_scales": "training", "set_sampling": "training", "train_step": "training",
    "add_scale": "calibration", "calibrate": "calibration", "remove_scale": "calibration",
    "diagnostics": None, "zoo": None,
    "export": "io", "load": "io", "load_plain": "io", "load_weights": "weights", "save": "io",
    "save_per_scale": "io",
    "export_onnx": "deploy", "export_program": "deploy",
    "EvaluationReport": "evaluation_report", "evaluate": "evaluation",
    "Cascade": "cascade", "CascadeReport": "cascade", "CascadeResult": "cascade", "fit_cascade": "cascade",
    "load_cascade": "io",
    "DetectorBatch": "detector_split", "DetectorCore": "detector_split", "detector_core": "detector_split",
    "detector_postprocess": "detector_split", "detector_preprocess": "detector_split",
}

__all__ = [
    "Cascade", "CascadeReport", "CascadeResult", "ConversionError", "DetectorBatch", "DetectorCore",
    "EvaluationReport", "FROZEN_BATCH_NORM_TYPES", "SCTLoss", "ScaleContext", "ScaleOutputs",
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
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    source = _SOURCES[name]
    module = importlib.import_module(f"{__name__}.{source or name}")
    value = module if source is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from . import diagnostics, zoo
    from .cascade import Cascade, CascadeReport, CascadeResult, fit_cascade
    from .bn import FROZEN_BATCH_NORM_TYPES, ScaleSpecificBatchNorm, is_batch_norm
    from .calibration import add_scale, calibrate, remove_scale
    from .context import ScaleContext
    from .conversion import convert
    from .converted import context_of, extract, original_class, route, scale, scale_specific_layers, scales_of
    from .deploy import export_onnx, export_program
    from .detector_split import DetectorBatch, DetectorCore, detector_core, detector_postprocess, detector_preprocess
    from .discovery import ConversionError, find_batch_norms
    from .evaluation import evaluate
    from .evaluation_report import EvaluationReport
    from .io import export, load, load_cascade, load_plain, save, save_per_scale
    from .weights import load_weights
    from .sampling import ScaleOutputs, resize_to
    from .training import SCTLoss, StepResult, random_scale_subset, sampling_scales, set_sampling, train_step
