"""torch.export of a converted model: the example input, which dims stay dynamic, the trace, and
the checks that refuse a program that cannot run (used by both ``.pt2`` and ONNX export)."""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.scales import Scale, largest_index, model_device, model_dtype, smallest_index
from ..core.model import context_of, extract, unwrap
from .._utils.modes import run_mode


def example_for(model: nn.Module, scale: Optional[Scale], example_input: Optional[torch.Tensor]) -> torch.Tensor:
    """A batch-2 input at ``scale`` (or the largest scale) on the model's device and dtype."""
    ctx = context_of(model)
    if example_input is not None:
        return example_input
    hw = ctx.sizes[ctx.index(scale) if scale is not None else largest_index(ctx.sizes)]
    lead = tuple(ctx.probe_lead)
    device, dtype = model_device(unwrap(model)), model_dtype(unwrap(model))
    # batch 2: a batch of 1 would be specialised to 1 (dynamo's 0/1 rule)
    return torch.randn(2, *lead[1:], *hw, device=device, dtype=dtype)


def dynamic_shapes(x: torch.Tensor, switchable: bool, frames: bool = True) -> Tuple[Dict[int, Any]]:
    """Batch and (``frames``) a clip's frames (N, C, T, H, W) dynamic; H and W when the file switches."""
    dims: Dict[int, Any] = {d: torch.export.Dim.AUTO for d in [0, *(range(2, x.dim() - 2) if frames else ())]}
    if switchable:
        dims.update({x.dim() - 2: torch.export.Dim.AUTO, x.dim() - 1: torch.export.Dim.AUTO})
    return (dims,)


def size_oblivious() -> contextlib.AbstractContextManager:
    """Trace sizes without dynamo's 0/1 specialisation: a program traced at the largest scale
    would otherwise carry guards (a final map of 2x2 is not 1x1) that refuse the smallest."""
    try:
        from torch.fx.experimental import _config

        if hasattr(_config, "backed_size_oblivious"):  # torch >= 2.7
            return _config.patch(backed_size_oblivious=True)
        return contextlib.nullcontext()
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return contextlib.nullcontext()


def module_to_export(model: nn.Module, scale: Optional[Scale]) -> nn.Module:
    return extract(model, scale) if scale is not None else unwrap(model)


def check_size_stays_dynamic(program: "torch.export.ExportedProgram", x: torch.Tensor) -> None:
    """A switchable program whose H or W export fixed to one value cannot switch: say so."""
    signature = program.graph_signature
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder"
                       and n.name not in signature.inputs_to_parameters
                       and n.name not in signature.inputs_to_buffers
                       and n.name not in signature.inputs_to_lifted_tensor_constants)
    shape = placeholder.meta["val"].shape
    static = [i for i in (x.dim() - 2, x.dim() - 1) if not isinstance(shape[i], torch.SymInt)]
    if static:
        raise ValueError(
            f"torch.export fixed the input's {'height' if x.dim() - 2 in static else 'width'} to "
            f"{int(shape[static[0]])}: this architecture does not accept a dynamic image size, so one "
            "file cannot serve every scale; export each scale instead (scale=...)"
        )


def trace(module: nn.Module, x: torch.Tensor, dynamic_size: bool) -> "torch.export.ExportedProgram":
    with run_mode(module), warnings.catch_warnings(), size_oblivious():
        warnings.simplefilter("ignore", UserWarning)
        try:
            program = torch.export.export(module, (x,), dynamic_shapes=dynamic_shapes(x, dynamic_size), strict=False)
        except Exception as first:  # noqa: BLE001 - torch.export fails in many types (UserError, guard and constraint errors, RuntimeError)
            if x.dim() != 5:
                raise
            # a clip model whose frame count torch.export cannot keep symbolic (s3d's pooling
            # arithmetic): the frames stay at the example's length; if that fails too, both errors show
            try:
                program = torch.export.export(module, (x,), strict=False,
                                              dynamic_shapes=dynamic_shapes(x, dynamic_size, frames=False))
            except Exception as second:  # noqa: BLE001 - as above
                raise second from first
    if dynamic_size:
        check_size_stays_dynamic(program, x)
    return program


def refuse_upstream_limits(model: nn.Module, example_input: Optional[torch.Tensor]) -> None:
    """A detection model exports only where torchvision's plain model does with this torch: try
    the plain model (the first scale) and refuse, in one line, when it cannot be traced either."""
    ctx = context_of(model)
    if not ctx.resizer:
        return
    plain = extract(model, ctx.scales[0])
    try:  # torch prints the whole partial graph of a failed trace to stderr: keep the one line
        with contextlib.redirect_stderr(io.StringIO()):
            trace(plain, example_for(model, ctx.scales[0], example_input), dynamic_size=False)
    except Exception as e:  # noqa: BLE001 - any failure of the plain model is upstream
        reason = " ".join(str(e).split())[:160]
        raise ValueError(
            f"torch.export cannot trace torchvision's plain {type(plain).__name__} with torch "
            f"{torch.__version__} either ({type(e).__name__}: {reason}): the limit is upstream "
            "(data-dependent shapes in its post-processing), so no file was written; save each scale "
            "with sct.save_per_scale, whose checkpoints load into the plain model") from None
    finally:
        del plain


def export_program_object(model: nn.Module, scale: Optional[Scale] = None,
                          example_input: Optional[torch.Tensor] = None) -> "torch.export.ExportedProgram":
    """``torch.export`` of the switchable model (``scale=None``) or of one scale's plain model."""
    refuse_upstream_limits(model, example_input)
    return trace(module_to_export(model, scale), example_for(model, scale, example_input), scale is None)


def probe_inputs(model: nn.Module, scale: Optional[Scale],
                  example_input: Optional[torch.Tensor]) -> List[Tuple[Scale, torch.Tensor]]:
    """An input at every scale a file serves (the caller's leading dims and dtype, if given)."""
    ctx = context_of(model)
    probes = []
    for s in (ctx.scales if scale is None else [scale]):
        x = example_for(model, s, None)
        if example_input is not None:
            x = torch.randn(*example_input.shape[:-2], *x.shape[-2:], dtype=example_input.dtype)
        probes.append((s, x))
    return probes


def program_failure(program: "torch.export.ExportedProgram",
                     probes: Sequence[Tuple[Scale, torch.Tensor]]) -> Optional[Tuple[Scale, str]]:
    """The first probe's (scale, reason) at which ``program`` fails to run, or None."""
    module = program.module()
    for s, x in probes:
        try:
            with torch.no_grad():
                module(x)
        except Exception as e:  # noqa: BLE001 - any failure means the file would not serve s
            return s, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


def checked_program(model: nn.Module, scale: Optional[Scale],
                     example_input: Optional[torch.Tensor]) -> "torch.export.ExportedProgram":
    """The program, run at every scale it serves; a switchable one traced at the largest scale
    that fails at another (a size guard torch.export kept) is traced again at the smallest."""
    probes = probe_inputs(model, scale, example_input)
    program = export_program_object(model, scale, example_input)
    failure = program_failure(program, probes)
    if failure is not None and scale is None and example_input is None:
        ctx = context_of(model)
        smallest = ctx.scales[smallest_index(ctx.scales)]
        try:
            retry = export_program_object(model, None, example_for(model, smallest, None))
        except Exception:  # noqa: BLE001 - the first program's failure is the one to report
            retry = None
        if retry is not None and program_failure(retry, probes) is None:
            return retry
    if failure is not None:
        raise ValueError(
            f"the torch.export program fails at scale {failure[0]!r} ({failure[1]}); nothing was written. "
            "Export each scale on its own (scale=...)")
    return program
