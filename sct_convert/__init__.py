"""sct-convert: Scale Calibrated Training for any timm / torchvision CNN, without source edits.

``sct.convert(model, scales=[224, 192, 128])`` gives every batch norm one branch per scale
(Scale-Specific BN) and routes each input to the branch of its size.

The public names below load on first use, so ``import sct_convert`` (and ``sct-convert --help``)
does not pay for importing torch, torchvision and timm until a name that needs them is used.
"""
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

# public name -> the submodule that defines it (a submodule itself where the name is the module)
_SOURCES = {
    "FROZEN_BATCH_NORM_TYPES": "bn", "ScaleSpecificBatchNorm": "bn", "is_batch_norm": "bn",
    "ScaleContext": "context",
    "ConversionError": "discovery", "context_of": "convert", "convert": "convert", "extract": "convert",
    "find_batch_norms": "discovery", "original_class": "convert", "route": "convert", "scale": "convert",
    "scale_specific_layers": "convert", "scales_of": "convert",
    "ScaleOutputs": "sampling", "resize_to": "sampling",
    "SCTLoss": "training", "StepResult": "training", "random_scale_subset": "training",
    "sampling_scales": "training", "set_sampling": "training", "train_step": "training",
    "add_scale": "calibrate", "calibrate": "calibrate", "remove_scale": "calibrate",
    "diagnostics": None, "zoo": None,
    "export": "io", "load": "io", "load_plain": "io", "load_weights": "io", "save": "io",
    "save_per_scale": "io",
    "export_onnx": "deploy", "export_program": "deploy",
}

__all__ = [
    "ConversionError", "FROZEN_BATCH_NORM_TYPES", "SCTLoss", "ScaleContext", "ScaleOutputs",
    "ScaleSpecificBatchNorm", "StepResult", "add_scale", "calibrate", "context_of", "convert",
    "diagnostics", "export", "export_onnx", "export_program", "extract", "find_batch_norms",
    "is_batch_norm", "load", "load_plain", "load_weights", "original_class", "random_scale_subset",
    "remove_scale", "resize_to", "route", "sampling_scales", "save", "save_per_scale", "scale",
    "scale_specific_layers", "scales_of", "set_sampling", "train_step", "zoo",
]


class _Package(types.ModuleType):
    """This package's module type: public names resolve on first use (PEP 562 does the same for
    plain modules), and the functions ``convert`` and ``calibrate`` keep their names when the
    import system binds the same-named submodules onto the package."""

    def __getattr__(self, name: str) -> Any:
        if name not in _SOURCES:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        source = _SOURCES[name]
        module = importlib.import_module(f"{self.__name__}.{source or name}")
        value = module if source is None else getattr(module, name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _SOURCES.get(name) == name:
            return  # the submodule stays reachable as sys.modules["sct_convert.<name>"]
        super().__setattr__(name, value)

    def __dir__(self) -> List[str]:
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from . import diagnostics, zoo
    from .bn import FROZEN_BATCH_NORM_TYPES, ScaleSpecificBatchNorm, is_batch_norm
    from .calibrate import add_scale, calibrate, remove_scale
    from .context import ScaleContext
    from .convert import (
        context_of,
        convert,
        extract,
        original_class,
        route,
        scale,
        scale_specific_layers,
        scales_of,
    )
    from .deploy import export_onnx, export_program
    from .discovery import ConversionError, find_batch_norms
    from .io import export, load, load_plain, load_weights, save, save_per_scale
    from .sampling import ScaleOutputs, resize_to
    from .training import SCTLoss, StepResult, random_scale_subset, sampling_scales, set_sampling, train_step
