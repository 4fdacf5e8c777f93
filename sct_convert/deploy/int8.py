"""Int8 ONNX files: every scale quantized on its own images.

onnxruntime's static quantizer sees the top-level nodes of a graph only: run on a switchable file
it writes a file that is still float inside every ``If`` branch, and says nothing. So each scale's
plain graph is quantized on its own (its BN folded into the convs first, then Q/DQ pairs with
activation ranges calibrated on the user's images resized to that scale), and the quantized
graphs are assembled into the routed file as the float ones are (:mod:`.onnx_graph`).

The defaults are the ones x86 CPUs run fast: uint8 activations (asymmetric) and int8 weights,
symmetric, per output channel (QDQ). onnxruntime's own defaults (int8 activations) run ResNet-50
barely faster than float on a VNNI CPU; ``symmetric=True`` gives int8 symmetric activations, as
TensorRT's explicit-precision Q/DQ wants. After writing, :func:`branch_precision` reads the graph
(not the metadata) to tell which branches are quantized; a file that claims int8 with a float
branch is refused.

Needs ``onnx`` and ``onnxruntime`` (the ``[onnx]`` extra).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._utils.batches import images_of
from ..core.sampling import resize_to
from ..core.scales import HW, largest_index, parse_key, pixels, scale_key

#: How the activation ranges are chosen: each scale on its own images, or every scale on the
#: largest scale's (the single-resolution practice, kept to measure whether per-scale ranges matter).
RANGES = ("per_scale", "largest")
METHODS = ("minmax", "percentile", "entropy")
#: Ops whose weights carry the compute; a branch with none of them quantized is not int8.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True, eq=False)  # holds tensors and loaders: compared by identity
class Int8:
    """How to quantize an export to int8 (``sct.export_onnx(..., int8=sct.Int8(images))``).

    Args:
        images: calibration images: a tensor ``(N, C, H, W)`` (or clips ``(N, C, T, H, W)``), or
            an iterable of batches (tensors, ``(images, labels)`` tuples or dicts, as a
            ``DataLoader`` yields). Any size: they are resized to each scale as SCT's sampling does.
            Unlabelled is enough; with labels, the per-scale accuracy change is reported.
        symmetric: int8 symmetric activations (TensorRT's explicit Q/DQ) instead of uint8
            asymmetric ones (what x86 CPUs run fastest).
        reduce_range: 7-bit weights, for CPUs without VNNI (where 8-bit products can saturate).
        exclude_nodes: node names left in float (as in the exported graph; ``sct-convert inspect``
            lists none of them, Netron shows them).
        exclude_types: op types left in float (e.g. ``("Gemm",)`` for a float classifier head).
        ranges: ``"per_scale"`` calibrates each scale on its own resized images;
            ``"largest"`` every scale on the largest scale's (to compare).
        method: ``"minmax"``, ``"percentile"`` or ``"entropy"`` (onnxruntime's calibrators).
        max_images: calibration images used per scale (the first ones).
        labelled: labelled batches for the accuracy report instead of ``images`` (say, a
            validation loader); the report runs when either has labels.
    """

    images: Any
    symmetric: bool = False
    reduce_range: bool = False
    exclude_nodes: Sequence[str] = ()
    exclude_types: Sequence[str] = ()
    ranges: str = "per_scale"
    method: str = "minmax"
    max_images: int = 256
    labelled: Any = None

    def __post_init__(self) -> None:
        if self.ranges not in RANGES:
            raise ValueError(f"Int8(ranges={self.ranges!r}): choose one of {', '.join(map(repr, RANGES))}")
        if self.method not in METHODS:
            raise ValueError(f"Int8(method={self.method!r}): choose one of {', '.join(map(repr, METHODS))}")
        if self.max_images < 1:
            raise ValueError(f"Int8(max_images={self.max_images}): calibrate on at least one image")

    def settings(self) -> Dict[str, Any]:
        """What a file records of its quantization (``int8`` metadata, JSON)."""
        return {
            "format": "QDQ",
            "activations": "int8 symmetric" if self.symmetric else "uint8 asymmetric",
            "weights": "int8 symmetric per channel" + (" (7-bit, reduce_range)" if self.reduce_range else ""),
            "ranges": self.ranges, "method": self.method,
            "exclude_nodes": list(self.exclude_nodes), "exclude_types": list(self.exclude_types),
        }


def as_int8(int8: Any) -> Optional[Int8]:
    """``export_onnx``'s ``int8=``: an :class:`Int8`, or calibration images alone (its defaults)."""
    if int8 is None or isinstance(int8, Int8):
        return int8
    return Int8(int8)


def _batches(data: Any) -> Iterable[Any]:
    return [data] if isinstance(data, torch.Tensor) else data


def calibration_images(config: Int8) -> torch.Tensor:
    """Up to ``max_images`` of the calibration images, as one float tensor at their own size."""
    taken: List[torch.Tensor] = []
    count = 0
    for batch in _batches(config.images):
        x = images_of(batch).detach().float().cpu()
        taken.append(x[:config.max_images - count])
        count += len(taken[-1])
        if count >= config.max_images:
            break
    if not count:
        raise ValueError("Int8(images=...) holds no images: pass a tensor or a loader of calibration images")
    sizes = {tuple(x.shape[1:]) for x in taken}
    if len(sizes) > 1:
        raise ValueError(f"the calibration batches have different shapes {sorted(sizes)}: resize them to one "
                         "size first (each scale's images are then resized from it)")
    return torch.cat(taken)


def labelled_images(config: Int8) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` for the accuracy report, or ``None`` when no batch has labels."""
    from .._utils.batches import labelled

    xs, ys = [], []
    source = config.labelled if config.labelled is not None else config.images
    if isinstance(source, torch.Tensor):
        return None
    count = 0
    for batch in source:
        try:
            x, y = labelled(batch, "the int8 accuracy report")
        except ValueError:
            return None
        xs.append(x.detach().float().cpu())
        ys.append(y.detach().cpu())
        count += len(x)
        if count >= max(config.max_images, 1000 if config.labelled is not None else 0):
            break
    return (torch.cat(xs), torch.cat(ys)) if xs else None


class _Reader:
    """onnxruntime's ``CalibrationDataReader``: the images in batches of 32, then ``None``."""

    def __init__(self, name: str, images: torch.Tensor) -> None:
        self._feeds = iter([{name: images[i:i + 32].numpy()} for i in range(0, len(images), 32)])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._feeds, None)

    def rewind(self) -> None:  # the entropy/percentile calibrators may ask; one pass is all they get
        pass


def _op_types(exclude: Sequence[str]) -> Optional[List[str]]:
    if not exclude:
        return None  # onnxruntime's own list
    from onnxruntime.quantization.registry import QDQRegistry

    return sorted(set(QDQRegistry) - set(exclude))


def quantize_graph(proto: Any, images: Optional[torch.Tensor], config: Int8,
                   ranges: Optional[Path] = None, keep_ranges: Optional[Path] = None) -> Any:
    """``proto`` (one scale's float graph, one input) as a QDQ int8 graph calibrated on ``images``.

    BN is folded into the convs first (onnxruntime's pre-processing), so each conv gets one
    per-channel int8 weight; the returned graph holds its own weights. ``ranges``: activation
    ranges measured on another graph of the same architecture (onnxruntime's calibration cache,
    by tensor name) instead of ``images``; ``keep_ranges``: where to save this graph's ranges.
    """
    import contextlib
    import io
    import shutil

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.method]
    with tempfile.TemporaryDirectory(prefix="sct-int8-") as tmp:
        source, folded, quantized, cache = (str(Path(tmp) / n) for n in
                                            ("float.onnx", "folded.onnx", "int8.onnx", "ranges.json"))
        onnx.save_model(proto, source)
        quant_pre_process(source, folded, skip_symbolic_shape=True)
        if ranges is not None:
            shutil.copy(ranges, cache)
        reader = None if ranges is not None else _Reader(proto.graph.input[0].name, images)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(
                folded, quantized, reader,
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=config.reduce_range,
                activation_type=QuantType.QInt8 if config.symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=method,
                op_types_to_quantize=_op_types(config.exclude_types),
                nodes_to_exclude=list(config.exclude_nodes) or None,
                extra_options={"ActivationSymmetric": config.symmetric, "WeightSymmetric": True},
                calibration_cache_path=cache,
            )
        if keep_ranges is not None:
            shutil.copy(cache, keep_ranges)
        return onnx.load(quantized)


def largest_ranges(model: torch.nn.Module, opset: int, images: torch.Tensor, config: Int8, path: Path) -> Path:
    """``ranges="largest"``: the activation ranges of the largest scale's graph on the images at
    that scale, saved at ``path`` for :func:`quantize_graph` to apply to every branch (the tensor
    names of one architecture's graphs agree from scale to scale)."""
    from ..core.model import context_of, extract
    from .onnx_trace import unfolded_onnx
    from .program import example_for

    ctx = context_of(model)
    largest = ctx.sizes[largest_index(ctx.sizes)]
    x = example_for(model, ctx.scales[largest_index(ctx.sizes)], None)
    quantize_graph(unfolded_onnx(extract(model, largest), x, opset), resize_to(images, largest), config,
                   keep_ranges=path)
    return path


def images_at(images: torch.Tensor, sizes: Sequence[HW], index: int) -> torch.Tensor:
    """The calibration images for branch ``index``: resized to its size as SCT's sampling does."""
    return resize_to(images, sizes[index])


# -- reading a file's precision back -------------------------------------------------------------


def _quantized_compute(graph: Any) -> Tuple[int, int]:
    """``(quantized, all)`` compute nodes of ``graph`` (not of its subgraphs): a compute node is
    quantized when its weight comes from a ``DequantizeLinear`` (QDQ) or it is a QLinear op."""
    producers = {out: node.op_type for node in graph.node for out in node.output}
    quantized = total = 0
    for node in graph.node:
        if node.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"):
            quantized, total = quantized + 1, total + 1
        elif node.op_type in COMPUTE_OPS:
            total += 1
            quantized += len(node.input) > 1 and producers.get(node.input[1]) == "DequantizeLinear"
    return quantized, total


def branch_precision(model: Any) -> Dict[str, str]:
    """Each branch's precision, read from the graph: ``{"32": "int8", "16": "float"}`` for a
    switchable file (branch label from its ``scale_<label>`` subgraph), ``{"": ...}`` for a file
    with one graph. ``"int8"`` when every compute node (conv, gemm, matmul) is quantized,
    ``"int8 (k of n compute nodes)"`` when some are left in float, ``"float"`` when none is."""
    def describe(graph: Any) -> str:
        quantized, total = _quantized_compute(graph)
        if quantized == 0:
            return "float"
        return "int8" if quantized == total else f"int8 ({quantized} of {total} compute nodes)"

    found: Dict[str, str] = {}

    def walk(graph: Any) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.g is not None and attr.g.name:
                    if attr.g.name.startswith("scale_"):
                        found[attr.g.name[len("scale_"):]] = describe(attr.g)
                    walk(attr.g)

    walk(model.graph)
    if not found:
        return {"": describe(model.graph)}
    return {label: found[label] for label in sorted(found, key=lambda k: -pixels(parse_key(k)))}


def refuse_float_branches(path: Path, int8_claimed: bool) -> Dict[str, str]:
    """Read the written file's precision per branch; ``ValueError`` when it claims int8 and a
    branch is float (nothing is written)."""
    import onnx

    precision = branch_precision(onnx.load(str(path), load_external_data=False))
    if int8_claimed:
        floats = [label or "the model" for label, p in precision.items() if p == "float"]
        if floats:
            raise ValueError(f"the int8 file holds float branches ({', '.join(floats)}): no compute node was "
                             "quantized there; nothing was written. Exclude fewer nodes or types, and report "
                             "the model")
    return precision


def accuracy_report(session: Any, model: torch.nn.Module, sizes: Sequence[HW],
                    data: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """Top-1 of the float model (eager) and of the int8 file (onnxruntime) at each scale, on
    ``data`` resized to it; and how often their top-1 agree."""
    from ..core.model import extract

    x_all, y_all = data
    name = session.get_inputs()[0].name
    report = {}
    for hw in sizes:
        plain = extract(model, hw).eval()
        x = resize_to(x_all, hw)
        right_fp = right_q = same = 0
        with torch.no_grad():
            for i in range(0, len(x), 64):
                fp = plain(x[i:i + 64]).argmax(1)
                q = torch.from_numpy(session.run(None, {name: x[i:i + 64].numpy()})[0]).argmax(1)
                y = y_all[i:i + 64]
                right_fp += int((fp == y).sum())
                right_q += int((q == y).sum())
                same += int((fp == q).sum())
        n = len(x)
        report[scale_key(hw)] = {"float_top1": round(100 * right_fp / n, 2), "int8_top1": round(100 * right_q / n, 2),
                                 "change": round(100 * (right_q - right_fp) / n, 2),
                                 "agreement": round(100 * same / n, 2), "images": n}
    return report


def report_json(report: Dict[str, Dict[str, float]]) -> str:
    return json.dumps(report, separators=(",", ":"))
