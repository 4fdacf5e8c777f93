"""Deployment files: ONNX and ``torch.export`` programs, one per scale or one for every scale.

A *switchable* file holds every branch and picks one in the graph from the input's shape
(exact size first, else the nearest scale by pixel count, as eager routing does); batch, height
and width are dynamic. In ONNX each scale is its own subgraph under a chain of ``If`` nodes,
sharing one copy of the weights that every branch reads unchanged, so runtimes fold each
branch's BN into its convs (:mod:`sct_convert.onnx_graph`). In a ``torch.export`` program each S-BN gathers its branch's
statistics with ``index_select``. A *per-scale* file is the plain original architecture with that
scale's BN (``sct.extract``), static in H and W, dynamic in batch, so runtimes fold the BN into
the conv.

An exported file cannot refuse an untrained size (``unknown_scale="error"``): it takes the
nearest branch; refuse in the caller. Under ``unknown_scale="interpolate"`` a ``torch.export``
program blends the two bracketing branches as eager does; an ONNX file routes to the nearest
branch and says so (metadata ``routing_note``, a warning at export). Metadata (scales, routing, architecture, versions) goes into
ONNX ``metadata_props`` and the ``.pt2`` archive's extra files, and ``sct-convert inspect``
reads it back. Files are written to a temporary name and renamed, never half-written.

ONNX needs the optional extra: ``pip install -e ".[onnx]"`` in a clone.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .context import Scale, normalize_scale, scale_key
from .conversion import context_of, extract, unwrap
from .dense import iter_tensors
from .probe import run_mode
from .files import atomic_write
from .io import model_metadata
from .progress import Steps

if TYPE_CHECKING:
    import onnx
    import onnx_ir

    from .onnx_graph import ExternalTensors

PathLike = Union[str, os.PathLike]

ONNX_FORMAT = "sct-convert/onnx"
PROGRAM_FORMAT = "sct-convert/pt2"
#: Name of the JSON metadata inside a ``.pt2`` archive (``torch.export.save`` extra files).
PROGRAM_METADATA = "sct_convert.json"
INPUT_NAME = "images"
DEFAULT_OPSET = 18


def _missing_onnx() -> ImportError:
    from .environment import install_command

    return ImportError(
        f"ONNX export needs onnx, onnxscript and onnxruntime: {install_command('onnx')} "
        "(or pip install onnx onnxscript onnxruntime)"
    )


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise _missing_onnx() from None


def deploy_metadata(model: nn.Module, scale: Optional[Scale], fmt: str) -> Dict[str, str]:
    """What a deployment file records: format, scales, routing, architecture and versions."""
    from . import __version__

    ctx = context_of(model)
    meta = {
        "format": fmt,
        "sct_convert_version": __version__,
        "torch_version": torch.__version__,
        **model_metadata(unwrap(model)),
        "scales": json.dumps([list(s) if isinstance(s, tuple) else s for s in ctx.scales]),
        "input_name": INPUT_NAME,
    }
    meta["arch"] = meta["arch"] or type(unwrap(model)).__name__
    if scale is None:
        # in-graph: exact size first, else (ONNX always) nearest by pixel count
        blends = ctx.unknown_scale == "interpolate" and fmt != ONNX_FORMAT
        meta["routing"] = "interpolate" if blends else "nearest"
        if ctx.unknown_scale == "interpolate" and not blends:
            meta["routing_note"] = ("the model blends the two nearest branches for in-between sizes "
                                    "(unknown_scale='interpolate'); this file runs the nearest branch")
            warnings.warn(
                "sct_convert: the switchable ONNX file routes sizes between trained scales to the "
                "nearest branch, not to the blend the model uses (unknown_scale='interpolate'); "
                "to ship chosen in-between sizes, sct.add_scale(model, size) (optionally "
                "sct.calibrate) before exporting, or use sct.export_program, which blends",
                UserWarning, stacklevel=3)
    else:
        meta["scale"] = scale_key(ctx.sizes[ctx.index(scale)])
        meta["routing"] = "fixed"
    return meta


def _example(model: nn.Module, scale: Optional[Scale], example_input: Optional[torch.Tensor]) -> torch.Tensor:
    """A batch-2 input at ``scale`` (or the largest scale) on the model's device and dtype."""
    ctx = context_of(model)
    if example_input is not None:
        return example_input
    hw = ctx.sizes[ctx.index(scale)] if scale is not None else max(ctx.sizes, key=lambda s: s[0] * s[1])
    lead = tuple(ctx.probe_lead)
    param = next((p for p in unwrap(model).parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    # batch 2: a batch of 1 would be specialised to 1 (dynamo's 0/1 rule)
    return torch.randn(2, *lead[1:], *hw, device=device, dtype=dtype)


def _dynamic_shapes(x: torch.Tensor, switchable: bool, frames: bool = True) -> Tuple[Dict[int, Any]]:
    """Batch and (``frames``) a clip's frames (N, C, T, H, W) dynamic; H and W when the file switches."""
    dims: Dict[int, Any] = {d: torch.export.Dim.AUTO for d in [0, *(range(2, x.dim() - 2) if frames else ())]}
    if switchable:
        dims.update({x.dim() - 2: torch.export.Dim.AUTO, x.dim() - 1: torch.export.Dim.AUTO})
    return (dims,)


def _size_oblivious() -> contextlib.AbstractContextManager:
    """Trace sizes without dynamo's 0/1 specialisation: a program traced at the largest scale
    would otherwise carry guards (a final map of 2x2 is not 1x1) that refuse the smallest."""
    try:
        from torch.fx.experimental import _config

        return _config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return contextlib.nullcontext()


def _module_to_export(model: nn.Module, scale: Optional[Scale]) -> nn.Module:
    return extract(model, scale) if scale is not None else unwrap(model)


def _check_size_stays_dynamic(program: "torch.export.ExportedProgram", x: torch.Tensor) -> None:
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


def _trace(module: nn.Module, x: torch.Tensor, dynamic_size: bool) -> "torch.export.ExportedProgram":
    with run_mode(module), warnings.catch_warnings(), _size_oblivious():
        warnings.simplefilter("ignore", UserWarning)
        try:
            program = torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes(x, dynamic_size), strict=False)
        except Exception:
            if x.dim() != 5:
                raise
            # a clip model whose frame count torch.export cannot keep symbolic (s3d's pooling
            # arithmetic): the frames stay at the example's length
            program = torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes(x, dynamic_size, frames=False),
                                          strict=False)
    if dynamic_size:
        _check_size_stays_dynamic(program, x)
    return program


def _refuse_upstream_limits(model: nn.Module, example_input: Optional[torch.Tensor]) -> None:
    """A detection model exports only where torchvision's plain model does with this torch: try
    the plain model (the first scale) and refuse, in one line, when it cannot be traced either."""
    ctx = context_of(model)
    if not ctx.resizer:
        return
    plain = extract(model, ctx.scales[0])
    try:  # torch prints the whole partial graph of a failed trace to stderr: keep the one line
        with contextlib.redirect_stderr(io.StringIO()):
            _trace(plain, _example(model, ctx.scales[0], example_input), dynamic_size=False)
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
    _refuse_upstream_limits(model, example_input)
    return _trace(_module_to_export(model, scale), _example(model, scale, example_input), scale is None)


def _to_onnx(program: "torch.export.ExportedProgram", opset: int, optimize: bool = True) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                 verbose=False, optimize=optimize)


def _onnx_branches(model: nn.Module, opset: int, example_input: Optional[torch.Tensor],
                   on_step: Callable[[str], None]) -> Iterator["onnx.ModelProto"]:
    """Each scale's plain model as ONNX, dynamic in batch, height and width, BN left unfolded so
    that the branches can share the conv weights (the runtime folds each branch's BN at load).

    Each scale is traced at its own size: some conversions bake the traced size into the graph
    (VGG's adaptive pooling becomes a fixed-kernel pool), so one trace reused for every scale
    would serve only its own. A generator: one scale's graph (and its copy of the weights) is
    alive at a time.
    """
    import onnx_ir
    import onnxscript.optimizer

    for scale in context_of(model).scales:
        x = _example(model, scale, None)
        if example_input is not None:  # the caller's leading dims and dtype, at this scale's size
            x = torch.randn(*example_input.shape[:-2], *x.shape[-2:], dtype=example_input.dtype,
                            device=example_input.device)
        graph = _to_onnx(_trace(extract(model, scale), x, dynamic_size=True), opset, optimize=False).model
        # constant folding only: the default optimizer folds BN into the convs, one copy per scale
        onnxscript.optimizer.fold_constants(graph)
        _drop_zero_conv_bias(graph)
        onnxscript.optimizer.remove_unused_nodes(graph)
        proto = [onnx_ir.serde.serialize_model(graph)]
        del graph  # it and the traced program hold the plain copy's weights, in reference cycles:
        gc.collect()  # free them before the next scale is traced
        on_step(f"traced scale {scale_key(normalize_scale(scale))}")
        yield proto.pop()  # nor does this frame keep the proto alive while the next one is traced


def _drop_zero_conv_bias(model: "onnx_ir.Model") -> None:
    """Remove a bias-free conv's bias input, which the unoptimised graph builds as zeros of the
    wrong shape (a ``Conv3d`` gets ``(C_out, 2)``; onnxruntime refuses it). Zeros are no bias."""
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) == 3 and node.inputs[2] is not None:
            bias = node.inputs[2].const_value
            if bias is not None and not bias.numpy().any():
                node.resize_inputs(2)


def _switchable_onnx(model: nn.Module, opset: int, example_input: Optional[torch.Tensor],
                     on_step: Callable[[str], None], store: "ExternalTensors") -> "onnx.ModelProto":
    from .onnx_graph import switchable_model

    sizes = context_of(model).sizes
    return switchable_model(_onnx_branches(model, opset, example_input, on_step), sizes,
                            [scale_key(s) for s in sizes], INPUT_NAME, store)


def _per_scale_onnx(model: nn.Module, scale: Scale, opset: int, example_input: Optional[torch.Tensor],
                    on_step: Callable[[str], None], store: "ExternalTensors") -> "onnx.ModelProto":
    from .onnx_graph import externalized

    proto = _to_onnx(export_program_object(model, scale, example_input), opset).model_proto
    on_step(f"traced scale {scale_key(normalize_scale(scale))}")
    return externalized(proto, store)


def _probe_inputs(model: nn.Module, scale: Optional[Scale],
                  example_input: Optional[torch.Tensor]) -> List[Tuple[Scale, torch.Tensor]]:
    """An input at every scale a file serves (the caller's leading dims and dtype, if given)."""
    ctx = context_of(model)
    probes = []
    for s in (ctx.scales if scale is None else [scale]):
        x = _example(model, s, None)
        if example_input is not None:
            x = torch.randn(*example_input.shape[:-2], *x.shape[-2:], dtype=example_input.dtype)
        probes.append((s, x))
    return probes


def _program_failure(program: "torch.export.ExportedProgram",
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


def _checked_program(model: nn.Module, scale: Optional[Scale],
                     example_input: Optional[torch.Tensor]) -> "torch.export.ExportedProgram":
    """The program, run at every scale it serves; a switchable one traced at the largest scale
    that fails at another (a size guard torch.export kept) is traced again at the smallest."""
    probes = _probe_inputs(model, scale, example_input)
    program = export_program_object(model, scale, example_input)
    failure = _program_failure(program, probes)
    if failure is not None and scale is None and example_input is None:
        ctx = context_of(model)
        smallest = min(ctx.scales, key=lambda s: normalize_scale(s)[0] * normalize_scale(s)[1])
        try:
            retry = export_program_object(model, None, _example(model, smallest, None))
        except Exception:  # noqa: BLE001 - the first program's failure is the one to report
            retry = None
        if retry is not None and _program_failure(retry, probes) is None:
            return retry
    if failure is not None:
        raise ValueError(
            f"the torch.export program fails at scale {failure[0]!r} ({failure[1]}); nothing was written. "
            "Export each scale on its own (scale=...)")
    return program


def export_program(model: nn.Module, path: PathLike, scale: Optional[Scale] = None, *,
                   example_input: Optional[torch.Tensor] = None, progress: bool = False) -> Path:
    """Write a ``torch.export`` program (``.pt2``) that serves every scale, or one.

    Args:
        model: a converted model (eval mode is used for the export; the model is left as it was).
        path: the ``.pt2`` file to write (atomically).
        scale: ``None`` for one program that routes every input size to its branch in the graph
            (dynamic batch, height and width); a scale for the plain architecture at that scale
            (dynamic batch). A clip's frame count (N, C, T, H, W) is dynamic in both.
        example_input: an input to trace with; by default a batch of 2 at the largest scale (and,
            if that program fails at another scale, at the smallest).
        progress: report the trace and the write (a bar on a terminal, lines otherwise).

    The program is run at every scale it serves before it is written; one that fails is refused
    (``ValueError`` naming the scale and the reason, nothing written).

    Returns:
        The path written. ``torch.export.load(path).module()`` runs it; the metadata is in the
        archive's extra file ``sct_convert.json`` (``sct-convert inspect`` prints it).
    """
    with Steps(2, "export pt2", progress) as steps:
        program = _checked_program(model, scale, example_input)
        steps.advance("traced and run" + ("" if scale is None else f" at scale {scale_key(normalize_scale(scale))}"))
        meta = deploy_metadata(model, scale, PROGRAM_FORMAT)
        path = atomic_write(path, lambda tmp: torch.export.save(
            program, tmp, extra_files={PROGRAM_METADATA: json.dumps(meta)}))
        steps.advance("written")
    return path


def export_onnx(model: nn.Module, path: PathLike, scale: Optional[Scale] = None, *,
                opset: int = DEFAULT_OPSET, example_input: Optional[torch.Tensor] = None,
                check: bool = True, progress: bool = False) -> Path:
    """Write an ONNX file that serves every scale, or one (needs the ``[onnx]`` extra).

    Args:
        model: a converted model.
        path: the ``.onnx`` file to write (atomically).
        scale: ``None`` for one file that routes each input size to its branch in the graph
            (``Shape``, ``ArgMin``, then one ``If`` subgraph per scale, sharing the conv weights;
            dynamic batch, height and width); a scale for the plain architecture at that scale (static
            height and width, dynamic batch). A clip's frame count (N, C, T, H, W) is dynamic in both.
        opset: ONNX opset version.
        example_input: an input to trace with; by default a batch of 2 at the largest scale.
        check: when onnxruntime is installed, run the file at every scale it serves before it is
            renamed into place, and refuse (``ValueError`` naming the scale and onnxruntime's
            reason, nothing written) a file that fails. Costs one session's memory and a forward
            per scale.
        progress: report each step (a scale traced, the file written, a scale run): a bar on a
            terminal, one line on stderr otherwise.

    Returns:
        The path written. Its ``metadata_props`` hold the scales, routing and architecture.
        The input is named ``images``.
    """
    _require_onnx()
    _refuse_upstream_limits(model, example_input)
    from .onnx_graph import will_check, write_onnx

    meta = deploy_metadata(model, scale, ONNX_FORMAT)
    meta["opset"] = str(opset)
    props = {f"sct_convert.{k}": v for k, v in meta.items()}
    probes = _probe_inputs(model, scale, example_input) if check else []
    traces = len(context_of(model).scales) if scale is None else 1
    with Steps(traces + 1 + (len(probes) if will_check(probes) else 0), "export onnx", progress) as steps:
        build = (functools.partial(_switchable_onnx, model, opset, example_input, steps.advance) if scale is None
                 else functools.partial(_per_scale_onnx, model, scale, opset, example_input, steps.advance))
        return write_onnx(path, build, props, probes, steps.advance)


def read_deploy_metadata(path: PathLike) -> Dict[str, str]:
    """The sct-convert metadata of an ``.onnx`` or ``.pt2`` file; ``ValueError`` if it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".onnx":
        try:
            import onnx
        except ImportError:
            raise _missing_onnx() from None
        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as e:  # noqa: BLE001 - onnx raises its own decode errors
            raise ValueError(f"{path} is not a readable ONNX file: {str(e).splitlines()[0][:200]}") from None
        meta = {k[len("sct_convert."):]: v for k, v in props.items() if k.startswith("sct_convert.")}
    else:
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith(f"extra/{PROGRAM_METADATA}")), None)
                meta = json.loads(z.read(name)) if name else {}
        except (zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable torch.export archive: {e}") from None
    if not meta:
        raise ValueError(f"{path} has no sct-convert metadata (not written by sct.export_onnx / export_program)")
    return meta


def onnx_max_relative_error(model: nn.Module, path: PathLike, sizes: Sequence[Tuple[int, int]],
                            batch: int = 2, seed: int = 0, threads: Optional[int] = None) -> List[float]:
    """Run ``path`` in onnxruntime (CPU) and the eager model at each size; max |diff| / max |eager|.

    Args:
        model: the converted model the file was exported from.
        path: an ONNX file written by :func:`export_onnx`.
        sizes: ``(height, width)`` pairs to compare at, one random batch each.
        batch: images per batch.
        seed: seed of the random inputs.
        threads: onnxruntime's intra-op threads (default: its own choice, every core).

    Returns:
        One relative error per size: max absolute difference over max absolute eager output,
        the worst of the model's outputs (a dict or list output is compared tensor by tensor,
        in order, with the file's outputs).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise _missing_onnx() from None
    ctx = context_of(model)
    lead = tuple(ctx.probe_lead)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    errors = []
    module = unwrap(model)
    with run_mode(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the nearest-branch notice for in-between sizes
        for hw in sizes:
            x = torch.randn(batch, *lead[1:], *hw, generator=g)
            wants = [t.float().cpu() for t in iter_tensors(module(x.to(next(module.parameters()).device)))]
            gots = [torch.from_numpy(a) for a in session.run(None, {name: x.numpy()})]
            if len(gots) != len(wants):
                raise ValueError(f"{path} has {len(gots)} outputs, the model returns {len(wants)} tensors")
            errors.append(max(float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
                              for got, want in zip(gots, wants)))
    return errors


__all__ = ["export_onnx", "export_program", "read_deploy_metadata", "onnx_max_relative_error"]
