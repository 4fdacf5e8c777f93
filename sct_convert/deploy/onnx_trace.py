"""A module (or one scale's plain model) traced by ``torch.export`` and written as ONNX.

The exporters above it (switchable classifier files, detector files) all start here: one input
name, one default opset, one check for the optional ``[onnx]`` extra. Imports ``onnx`` only
inside the functions that need it, so the rest of the package loads without the extra.
"""
from __future__ import annotations

import gc
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn

from .program import trace

if TYPE_CHECKING:
    import onnx
    import onnx_ir

#: The name of every exported file's image input.
INPUT_NAME = "images"
DEFAULT_OPSET = 18


def missing_onnx() -> ImportError:
    from .._utils.environment import install_command

    return ImportError(
        f"ONNX export needs onnx, onnxscript and onnxruntime: {install_command('onnx')} "
        "(or pip install onnx onnxscript onnxruntime)"
    )


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise missing_onnx() from None


def to_onnx(program: "torch.export.ExportedProgram", opset: int, optimize: bool = True) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                 verbose=False, optimize=optimize)


def unfolded_onnx(module: nn.Module, x: torch.Tensor, opset: int,
                  output_names: Optional[Sequence[str]] = None) -> "onnx.ModelProto":
    """``module`` as ONNX through ``torch.export``, dynamic in batch, height and width, BN left
    unfolded so that the branches of a switchable file can share the conv weights (the runtime
    folds each branch's BN at load); outputs renamed to ``output_names`` when given."""
    import onnx_ir
    import onnxscript.optimizer

    graph = to_onnx(trace(module, x, dynamic_size=True), opset, optimize=False).model
    # constant folding only: the default optimizer folds BN into the convs, one copy per scale
    onnxscript.optimizer.fold_constants(graph)
    drop_zero_conv_bias(graph)
    onnxscript.optimizer.remove_unused_nodes(graph)
    if output_names is not None:
        for value, name in zip(graph.graph.outputs, output_names):
            value.name = name
    proto = onnx_ir.serde.serialize_model(graph)
    del graph  # it and the traced program hold the module's weights, in reference cycles:
    gc.collect()  # free them before the caller traces the next one
    return proto


def drop_zero_conv_bias(model: "onnx_ir.Model") -> None:
    """Remove a bias-free conv's bias input, which the unoptimised graph builds as zeros of the
    wrong shape (a ``Conv3d`` gets ``(C_out, 2)``; onnxruntime refuses it). Zeros are no bias."""
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) == 3 and node.inputs[2] is not None:
            bias = node.inputs[2].const_value
            if bias is not None and not bias.numpy().any():
                node.resize_inputs(2)
