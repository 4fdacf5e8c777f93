"""Deployment files: ONNX and ``torch.export`` programs, one per scale or one for every scale.

A *switchable* file holds every branch and picks one in the graph from the input's shape
(exact size first, else the nearest scale by pixel count, as eager routing does); batch, height
and width are dynamic. In ONNX each scale is its own subgraph under a chain of ``If`` nodes,
sharing one copy of the weights that every branch reads unchanged, so runtimes fold each
branch's BN into its convs (:mod:`sct_convert.deploy.onnx_graph`). In a ``torch.export`` program each S-BN gathers its branch's
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

import functools
import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.scales import Scale, model_device, normalize_scale, scale_key, scales_to_json
from ..core.model import context_of, extract, unwrap
from ..training.dense import iter_tensors
from .._utils.modes import run_mode
from ..runtime import open_session
from .._utils.files import PathLike, atomic_write
from ..checkpoints.format import model_metadata, versions_json
from ..errors import FileFormatError
from ..metadata_fields import DEPLOY_FIELDS, check_fields
from .._utils.progress import Steps
from .onnx_trace import DEFAULT_OPSET, INPUT_NAME, missing_onnx, require_onnx, to_onnx, unfolded_onnx
from .int8 import Int8, as_int8
from .openvino_check import openvino_version
from .._utils.environment import install_command
from .program import (checked_program, example_for, export_program_object, probe_inputs, refuse_upstream_limits)

if TYPE_CHECKING:
    import onnx

    from .onnx_graph import ExternalTensors


ONNX_FORMAT = "sct-convert/onnx"
PROGRAM_FORMAT = "sct-convert/pt2"
#: Name of the JSON metadata inside a ``.pt2`` archive (``torch.export.save`` extra files).
PROGRAM_METADATA = "sct_convert.json"
#: What ``export_onnx(part=...)`` writes of a torchvision detector: the whole model, or its core.
PARTS = ("model", "core")


def deploy_metadata(model: nn.Module, scale: Optional[Scale], fmt: str) -> Dict[str, str]:
    """What a deployment file records: format, scales, routing, architecture and versions."""
    ctx = context_of(model)
    meta = {
        "format": fmt,
        **model_metadata(unwrap(model)),
        "versions": versions_json(),
        "scales": scales_to_json(ctx.scales),
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


def onnx_branches(model: nn.Module, opset: int, example_input: Optional[torch.Tensor],
                  on_step: Callable[[str], None] = lambda label: None) -> Iterator["onnx.ModelProto"]:
    """Each scale's plain model as ONNX (:func:`unfolded_onnx`).

    Each scale is traced at its own size: some conversions bake the traced size into the graph
    (VGG's adaptive pooling becomes a fixed-kernel pool), so one trace reused for every scale
    would serve only its own. A generator: one scale's graph (and its copy of the weights) is
    alive at a time.
    """
    for scale in context_of(model).scales:
        x = example_for(model, scale, None)
        if example_input is not None:  # the caller's leading dims and dtype, at this scale's size
            x = torch.randn(*example_input.shape[:-2], *x.shape[-2:], dtype=example_input.dtype,
                            device=example_input.device)
        proto = [unfolded_onnx(extract(model, scale), x, opset)]
        on_step(f"traced scale {scale_key(normalize_scale(scale))}")
        yield proto.pop()  # nor does this frame keep the proto alive while the next one is traced


def _switchable_onnx(model: nn.Module, opset: int, example_input: Optional[torch.Tensor],
                     on_step: Callable[[str], None], store: "ExternalTensors") -> "onnx.ModelProto":
    from .onnx_graph import switchable_model

    sizes = context_of(model).sizes
    return switchable_model(onnx_branches(model, opset, example_input, on_step), sizes,
                            [scale_key(s) for s in sizes], INPUT_NAME, store)


def _per_scale_onnx(model: nn.Module, scale: Scale, opset: int, example_input: Optional[torch.Tensor],
                    on_step: Callable[[str], None], store: "ExternalTensors") -> "onnx.ModelProto":
    from .onnx_graph import externalized

    proto = to_onnx(export_program_object(model, scale, example_input), opset).model_proto
    on_step(f"traced scale {scale_key(normalize_scale(scale))}")
    return externalized(proto, store)


def _int8_per_scale(model: nn.Module, scale: Scale, opset: int, example_input: Optional[torch.Tensor],
                    images: torch.Tensor, config: "Int8", ranges: Optional[Path], on_step: Callable[[str], None],
                    store: "ExternalTensors") -> "onnx.ModelProto":
    from .int8 import images_at, quantize_graph
    from .onnx_graph import externalized

    ctx = context_of(model)
    proto = to_onnx(export_program_object(model, scale, example_input), opset).model_proto
    on_step(f"traced scale {scale_key(normalize_scale(scale))}")
    quantized = quantize_graph(proto, images_at(images, ctx.sizes, ctx.index(scale)), config, ranges)
    on_step(f"quantized scale {scale_key(normalize_scale(scale))}")
    return externalized(quantized, store)


def _int8_switchable(model: nn.Module, opset: int, example_input: Optional[torch.Tensor], images: torch.Tensor,
                     config: "Int8", ranges: Optional[Path], on_step: Callable[[str], None],
                     store: "ExternalTensors") -> "onnx.ModelProto":
    from .int8 import images_at, quantize_graph
    from .onnx_graph import switchable_model

    sizes = context_of(model).sizes

    def quantized() -> Iterator["onnx.ModelProto"]:  # one scale's graph at a time, as the float file
        for i, proto in enumerate(onnx_branches(model, opset, example_input, on_step)):
            graph = [quantize_graph(proto, images_at(images, sizes, i), config, ranges)]
            del proto
            on_step(f"quantized scale {scale_key(sizes[i])}")
            yield graph.pop()

    return switchable_model(quantized(), sizes, [scale_key(s) for s in sizes], INPUT_NAME, store)


def _verify_onnx(model: nn.Module, probes: Sequence[Tuple[Scale, torch.Tensor]], config: Optional["Int8"],
                 openvino: Optional[bool], switchable: bool, path: Path) -> Dict[str, str]:
    """What is checked of a written (not yet renamed) ONNX file beyond running it: a file that
    claims int8 quantized in every branch, the accuracy change when labels were given, and
    OpenVINO's answer; returns the metadata it adds."""
    from .int8 import accuracy_report, labelled_images, refuse_float_branches, report_json
    from .openvino_check import openvino_problem, openvino_version
    from .onnx_graph import will_check

    props: Dict[str, str] = {}
    refuse_float_branches(path, config is not None)
    if config is not None:
        data = labelled_images(config)
        if data is not None:
            session = open_session(path, quiet=True)
            sizes = [normalize_scale(s) for s, _ in probes] or list(context_of(model).sizes)
            report = accuracy_report(session, model, sizes, data)
            props["sct_convert.int8_report"] = report_json(report)
    if not will_check(probes):
        return props
    import onnxruntime  # will_check found it

    checked = [f"onnxruntime {onnxruntime.__version__}"]
    version = openvino_version() if openvino is not False else None
    if version is not None:
        problem = openvino_problem(path, probes, int8=config is not None)
        if problem is None:
            checked.append(f"openvino {version}")
        else:
            runs = "at every scale" if switchable else ""
            warnings.warn(f"sct_convert: {problem}; the file is written: onnxruntime runs it {runs}".rstrip(),
                          UserWarning, stacklevel=4)
    props["sct_convert.checked_in"] = ", ".join(checked)
    return props


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
        program = checked_program(model, scale, example_input)
        steps.advance("traced and run" + ("" if scale is None else f" at scale {scale_key(normalize_scale(scale))}"))
        meta = deploy_metadata(model, scale, PROGRAM_FORMAT)
        path = atomic_write(path, lambda tmp: torch.export.save(
            program, tmp, extra_files={PROGRAM_METADATA: json.dumps(meta)}))
        steps.advance("written")
    return path


def export_onnx(model: nn.Module, path: PathLike, scale: Optional[Scale] = None, *,
                opset: int = DEFAULT_OPSET, example_input: Optional[torch.Tensor] = None,
                check: bool = True, progress: bool = False, exporter: Optional[str] = None,
                part: str = "model", int8: Any = None, openvino: Optional[bool] = None) -> Path:
    """Write an ONNX file that serves every scale, or one (needs the ``[onnx]`` extra).

    Args:
        model: a converted model, or a :class:`~sct_convert.Cascade` (its model's switchable file,
            with the stages and thresholds in the metadata, for :mod:`sct_convert.runtime`).
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
        exporter: torchvision detectors only: ``"dynamo"`` or ``"torchscript"`` to use one route;
            ``None`` tries ``torch.export`` first, then the TorchScript-based exporter
            (:mod:`sct_convert.deploy.detector_onnx`).
        part: torchvision detectors only: ``"model"`` for the whole detector of one scale,
            ``"core"`` for its backbone and dense heads (:mod:`sct_convert.detection.split`).
        int8: an :class:`~sct_convert.Int8` (or calibration images alone, for its defaults) to
            write an int8 QDQ file: uint8 activations, int8 per-channel weights, each scale's
            activation ranges calibrated on the images resized to that scale, each branch of a
            switchable file quantized on its own (:mod:`sct_convert.deploy.int8`). A file with a
            float branch is refused; with labelled images the metadata ``int8_report`` holds
            each scale's top-1 in float and int8.
        openvino: check the file in OpenVINO too, against onnxruntime (``None``: when OpenVINO is
            installed; ``True`` requires it). A file OpenVINO cannot run or answers differently is
            still written, with a one-line warning; ``checked_in`` in the metadata lists the
            runtimes that ran it.

    A torchvision detector (a model whose transform resizes its input) exports either the whole
    detector of one scale (``scale=`` required): its plain detector, taking one ``(3, H, W)``
    image of any size and returning the detections, checked in onnxruntime against
    ``sct.extract(model, scale)`` on two image sizes; or (``part="core"``) its core, for every
    scale in one file routed by the batch's size (``scale=None``) or for one scale, taking the
    batch ``sct.detector_preprocess`` builds and returning the feature maps and raw head outputs
    that ``sct.detector_postprocess`` turns into detections, checked in onnxruntime at every
    scale it serves (pre + file + post against the eager model).

    Returns:
        The path written. Its ``metadata_props`` hold the scales, routing and architecture.
        The input is named ``images``.
    """
    require_onnx()
    from ..serving.cascade import Cascade

    cascade_meta: Dict[str, str] = {}
    if isinstance(model, Cascade):
        if scale is not None or part != "model":
            raise ValueError("a cascade exports as its model's switchable file, which serves every stage: "
                             "export_onnx(cascade, path) without scale= or part=")
        cascade_meta, model = model.metadata(), model.model
    config = as_int8(int8)
    _refuse_onnx_request(model, scale, part, exporter, config, openvino)
    if context_of(model).resizer:
        return _detector_onnx(model, path, scale, opset, check, progress, exporter, part)
    if scale is None:  # a per-scale file traces through export_program_object, which checks this
        refuse_upstream_limits(model, example_input)
    from .onnx_graph import will_check, write_onnx

    meta = deploy_metadata(model, scale, ONNX_FORMAT)
    meta["opset"] = str(opset)
    meta["precision"] = "float32" if config is None else "int8"
    images = None
    if config is not None:
        from .int8 import calibration_images

        images = calibration_images(config)
        meta["int8"] = json.dumps({**config.settings(), "images": len(images)}, separators=(",", ":"))
    meta.update(cascade_meta)
    props = {f"sct_convert.{k}": v for k, v in meta.items()}
    probes = probe_inputs(model, scale, example_input) if check else []
    traces = (len(context_of(model).scales) if scale is None else 1) * (1 if config is None else 2)
    verify = functools.partial(_verify_onnx, model, probes, config, openvino, scale is None)
    with Steps(traces + 1 + (len(probes) if will_check(probes) else 0), "export onnx", progress) as steps, \
            tempfile.TemporaryDirectory(prefix="sct-ranges-") as tmp:
        build = _onnx_builder(model, scale, opset, example_input, config, images, Path(tmp), steps.advance)
        return write_onnx(path, build, props, probes, steps.advance, verify)


def _refuse_onnx_request(model: nn.Module, scale: Optional[Scale], part: str, exporter: Optional[str],
                         config: Optional["Int8"], openvino: Optional[bool]) -> None:
    """The argument combinations :func:`export_onnx` refuses, before anything is traced."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: choose one of {', '.join(map(repr, PARTS))}")
    if openvino and openvino_version() is None:
        raise ImportError(f"openvino=True needs OpenVINO: {install_command('openvino')} (or pip install openvino)")
    if context_of(model).resizer:
        if config is not None:
            raise ValueError("int8 export covers classifiers, segmentation and video models; a torchvision "
                             "detector's file is float (its post-processing is not quantizable): drop int8=")
        return
    if part != "model":
        raise ValueError("part='core' splits a torchvision detector (backbone and heads apart from its transform "
                         "and post-processing); this model exports whole (part='model')")
    if exporter is not None:
        raise ValueError("exporter= chooses the route of a torchvision detector's file; other models "
                         "export through torch.export only")


def _onnx_builder(model: nn.Module, scale: Optional[Scale], opset: int, example_input: Optional[torch.Tensor],
                  config: Optional["Int8"], images: Optional[torch.Tensor], tmp: Path,
                  advance: Callable[[str], None]) -> Callable[["ExternalTensors"], "onnx.ModelProto"]:
    """The call that builds the file's graph: float or int8, switchable or one scale."""
    if config is None:
        return (functools.partial(_switchable_onnx, model, opset, example_input, advance) if scale is None else
                functools.partial(_per_scale_onnx, model, scale, opset, example_input, advance))
    from .int8 import largest_ranges

    ranges = largest_ranges(model, opset, images, config, tmp / "ranges.json") if config.ranges == "largest" else None
    if scale is None:
        return functools.partial(_int8_switchable, model, opset, example_input, images, config, ranges, advance)
    return functools.partial(_int8_per_scale, model, scale, opset, example_input, images, config, ranges, advance)


def _detector_onnx(model: nn.Module, path: PathLike, scale: Optional[Scale], opset: int, check: bool,
                   progress: bool, exporter: Optional[str], part: str) -> Path:
    from .detector_onnx import EXPORTERS, write_core_onnx, write_detector_onnx
    from ..core.resizer import sized_attributes

    ctx = context_of(model)
    if exporter is not None and exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r}: choose one of {', '.join(EXPORTERS)}, or None to try them in order")
    routes = EXPORTERS if exporter is None else (exporter,)
    transform = unwrap(model).get_submodule(ctx.resizer)
    sizes = ctx.sizes if scale is None else [ctx.sizes[ctx.index(scale)]]
    transform_sizes = {scale_key(hw): sized_attributes(transform, hw) for hw in sizes}
    if part == "core":
        meta = deploy_metadata(model, scale, ONNX_FORMAT)
        if scale is None:
            meta["routing"] = "size_input"
        meta.update(opset=str(opset), part="core", transform_sizes=json.dumps(transform_sizes),
                    input_layout="(N, 3, H, W) batch from sct.detector_preprocess (resized, normalized, padded)")
        steps_total = len(sizes) * (2 if check else 1) + 1
        with Steps(steps_total, "export onnx core", progress) as steps:
            return write_core_onnx(unwrap(model), path, scale, meta, opset=opset, check=check, routes=routes,
                                   on_step=steps.advance)
    if scale is None:
        raise ValueError(
            "a torchvision detector exports one scale per ONNX file (its transform resizes to that "
            f"scale): pass scale=..., one of {', '.join(scale_key(s) for s in ctx.sizes)} (on the CLI, --scale); "
            "part='core' (--part core) writes one file of the backbone and heads that serves every scale")
    meta = deploy_metadata(model, scale, ONNX_FORMAT)
    meta.update(opset=str(opset), part="model", transform_sizes=json.dumps(transform_sizes))
    with Steps(2, "export onnx", progress) as steps:
        return write_detector_onnx(unwrap(model), path, scale, meta, opset=opset, check=check, routes=routes,
                                   on_step=steps.advance)


def read_deploy_metadata(path: PathLike) -> Dict[str, str]:
    """The sct-convert metadata of an ``.onnx`` or ``.pt2`` file, every field checked.

    Args:
        path: the file.

    Returns:
        Its fields (without the ``sct_convert.`` prefix ONNX keys carry). A file that cannot be
        read, holds no sct-convert metadata, or has a field that is missing, malformed or out
        of range is a :class:`~sct_convert.FileFormatError` naming the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".onnx":
        try:
            import onnx
            from google.protobuf.message import DecodeError
        except ImportError:
            raise missing_onnx() from None
        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except (DecodeError, OSError, ValueError) as e:  # protobuf's, for bytes that are not a model
            raise FileFormatError(f"{path} is not a readable ONNX file: {str(e).splitlines()[0][:200]}",
                                  path=path) from None
        meta = {k[len("sct_convert."):]: v for k, v in props.items() if k.startswith("sct_convert.")}
    else:
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith(f"extra/{PROGRAM_METADATA}")), None)
                meta = json.loads(z.read(name)) if name else {}
        except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise FileFormatError(f"{path} is not a readable torch.export archive: {e}", path=path) from None
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise FileFormatError(f"{path}: its {PROGRAM_METADATA} is not a JSON object of strings", path=path)
    if not meta:
        raise FileFormatError(f"{path} has no sct-convert metadata (not written by sct.export_onnx / export_program)",
                              path=path)
    if meta.get("format") not in (ONNX_FORMAT, PROGRAM_FORMAT):
        raise FileFormatError(f"{path}: metadata field 'format' is not {ONNX_FORMAT} or {PROGRAM_FORMAT} "
                              f"(got {meta.get('format')!r})", path=path, field="format")
    check_fields(meta, path, DEPLOY_FIELDS)
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
        import onnxruntime  # noqa: F401
    except ImportError:
        raise missing_onnx() from None
    ctx = context_of(model)
    lead = tuple(ctx.probe_lead)
    session = open_session(path, threads=threads)
    name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    errors = []
    module = unwrap(model)
    with run_mode(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the nearest-branch notice for in-between sizes
        for hw in sizes:
            x = torch.randn(batch, *lead[1:], *hw, generator=g)
            wants = [t.float().cpu() for t in iter_tensors(module(x.to(model_device(module))))]
            gots = [torch.from_numpy(a) for a in session.run(None, {name: x.numpy()})]
            if len(gots) != len(wants):
                raise ValueError(f"{path} has {len(gots)} outputs, the model returns {len(wants)} tensors")
            errors.append(max(float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
                              for got, want in zip(gots, wants)))
    return errors


__all__ = ["export_onnx", "export_program", "read_deploy_metadata", "onnx_max_relative_error"]
