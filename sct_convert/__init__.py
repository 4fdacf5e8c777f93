"""sct-convert: Scale Calibrated Training for any timm / torchvision CNN, without source edits.

``sct.convert(model, scales=[224, 192, 128])`` gives every batch norm one branch per scale
(Scale-Specific BN) and routes each input to the branch of its size.
"""
from .bn import FROZEN_BATCH_NORM_TYPES, ScaleSpecificBatchNorm, is_batch_norm
from .context import ScaleContext
from .convert import (
    ConversionError,
    context_of,
    convert,
    extract,
    find_batch_norms,
    original_class,
    route,
    scale,
    scale_specific_layers,
    scales_of,
)

__version__ = "0.1.0"

from .sampling import ScaleOutputs, resize_to  # noqa: E402
from .training import (  # noqa: E402
    SCTLoss,
    StepResult,
    random_scale_subset,
    sampling_scales,
    set_sampling,
    train_step,
)

from .calibrate import add_scale, calibrate, remove_scale  # noqa: E402
from . import diagnostics  # noqa: E402

# io and zoo import the package version, so they come after it.
from . import zoo  # noqa: E402
from .io import export, load, load_plain, load_weights, save, save_per_scale  # noqa: E402
from .deploy import export_onnx, export_program  # noqa: E402

__all__ = [
    "add_scale",
    "calibrate",
    "diagnostics",
    "remove_scale",
    "SCTLoss",
    "ScaleOutputs",
    "StepResult",
    "random_scale_subset",
    "resize_to",
    "sampling_scales",
    "set_sampling",
    "train_step",
    "ConversionError",
    "FROZEN_BATCH_NORM_TYPES",
    "ScaleContext",
    "ScaleSpecificBatchNorm",
    "context_of",
    "convert",
    "export",
    "export_onnx",
    "export_program",
    "extract",
    "find_batch_norms",
    "is_batch_norm",
    "load",
    "load_plain",
    "load_weights",
    "original_class",
    "route",
    "save",
    "save_per_scale",
    "scale",
    "scale_specific_layers",
    "scales_of",
    "zoo",
]
