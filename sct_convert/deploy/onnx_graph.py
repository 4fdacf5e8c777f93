"""One ONNX graph that serves every scale, assembled from the per-scale graphs.

Each scale's plain model is exported on its own (dynamic batch, height and width, BN not folded).
The assembled graph computes the branch index from the input's shape (``Shape``, exact ``(h, w)``
match first, else ``ArgMin`` over the pixel-count gap, as eager routing does) and runs that
scale's graph under a chain of ``If`` nodes. The weights of convs followed by BN, which every
branch reads unchanged, live once in the main graph, deduplicated by content, so the file is
little more than one scale's for a ResNet; the rest (BN statistics, weights of convs without BN,
of Gemm and MatMul) stays in its branch, because onnxruntime runs some ops slower on a weight
of an enclosing graph (see :func:`_shareable`). Each branch's BN statistics are constants of its
own subgraph, so runtimes fold them into the convs at load (onnxruntime does, per branch): the
switchable file runs as fast as a per-scale file, at the cost of one folded copy of the conv
weights per scale in memory.

Tensor bytes are streamed to a file (:class:`ExternalTensors`) as each branch is assembled, so
building the model holds one scale's graph at a time: a 2.6 GB RegNet with three scales ran out of
24 GB when every branch was held at once.

Needs ``onnx``; callers check the ``[onnx]`` extra first.
"""
from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Set, Tuple, TypeVar

import numpy as np
import onnx
import torch
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from ..core.scales import Scale
from .._utils.files import PathLike, atomic_write, staging_directory
from ..core.rule import onnx_route_nodes
from ..runtime import open_session

ROUTE = "sct_route/"
_Message = TypeVar("_Message", onnx.ModelProto, TensorProto)


class ExternalTensors:
    """One file that tensor bytes are moved to: a tensor keeps only its name, type, shape and a
    reference (``location``, ``offset``, ``length``), as ONNX's external data format has it.

    Args:
        path: the file to write; ``location`` is what the model records (the file's final name,
            relative to the model's directory).
        min_bytes: smaller tensors stay inline (onnx's own default threshold).
    """

    ALIGN = 64

    def __init__(self, path: Path, location: str, min_bytes: int = 1024):
        self.path = Path(path)
        self.location = location
        self.min_bytes = min_bytes
        self.size = 0
        self._file = open(self.path, "wb")

    def move(self, tensor: TensorProto) -> None:
        """Append ``tensor``'s raw bytes to the file and drop them from the proto."""
        if not tensor.HasField("raw_data"):
            return
        data = tensor.raw_data  # each read of the field is a copy
        if len(data) < self.min_bytes:
            return
        pad = -self.size % self.ALIGN
        self._file.write(b"\0" * pad)
        offset = self.size + pad
        self._file.write(data)
        self.size = offset + len(data)
        external_data_helper.set_external_data(tensor, self.location, offset, len(data))
        tensor.ClearField("raw_data")

    def close(self) -> None:
        self._file.close()


def detached(message: _Message) -> _Message:
    """A copy of ``message`` that shares no memory with it. Clearing a field of a protobuf message
    frees nothing, and a reference to a part keeps the whole message alive; once a tensor's bytes
    are moved to the file, what is kept must be a copy so the original (with its bytes) is freed."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def externalized(model: onnx.ModelProto, store: ExternalTensors) -> onnx.ModelProto:
    """``model`` with every tensor's bytes moved to ``store``, as a copy: the original keeps the
    moved bytes until it is freed (see :func:`detached`)."""
    for tensor in initializers(model.graph):
        store.move(tensor)
    return detached(model)


def initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every initializer of ``graph`` and of the subgraphs its nodes hold (``If`` branches)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from initializers(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from initializers(sub)


def _content_key(tensor: TensorProto) -> str:
    data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    digest = hashlib.sha256(data)
    digest.update(repr((tensor.data_type, tuple(tensor.dims))).encode())
    return digest.hexdigest()


def _int64(name: str, values: Any) -> TensorProto:
    array = np.asarray(values, dtype=np.int64)
    return numpy_helper.from_array(array, name)


def _shareable(graph: onnx.GraphProto) -> Set[str]:
    """Initializers that branches can read from the main graph without slowing the runtime: those
    that only feed a Conv followed by a BatchNormalization. The runtime folds each branch's BN into
    the conv, writing a new weight inside the branch, so the shared tensor is only read at load.

    Any other tensor stays inside its branch, because onnxruntime runs some ops slower on a weight
    of an enclosing graph: a conv without BN (MobileNetV3's squeeze-excite and head) reading a
    weight of the main graph stays out of the NCHWc layout (1.15x), and a Gemm reading its weight
    through two ``If`` levels, as every branch but the first does, runs 1.2 to 1.9x slower
    (``benchmarks/onnx_outer_scope.py``; MobileNetV3's classifier made its 128 px branch 1.06x).
    """
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, value in enumerate(node.input):
            consumers.setdefault(value, []).append((node, i))

    def folded_into_conv(node: onnx.NodeProto, i: int) -> bool:
        after = consumers.get(node.output[0], [])
        return (node.op_type == "Conv" and i in (1, 2) and len(after) == 1
                and after[0][0].op_type == "BatchNormalization" and after[0][1] == 0)

    return {t.name for t in graph.initializer
            if consumers.get(t.name) and all(folded_into_conv(n, i) for n, i in consumers[t.name])}


def _as_subgraph(graph: onnx.GraphProto, prefix: str, input_name: str, shared: Dict[str, str],
                 hoisted: List[TensorProto], name: str, store: ExternalTensors) -> onnx.GraphProto:
    """``graph`` as an ``If`` branch: no inputs (it reads ``input_name`` from the outer scope), its
    shareable initializers moved to the main graph (``hoisted``, deduplicated by content), every
    other name prefixed so that no two branches collide. ``graph``'s tensors are renamed in place
    and their bytes moved to ``store``: the caller drops ``graph`` afterwards."""
    renamed: Dict[str, str] = {}
    local: List[TensorProto] = []  # stays in the branch, under its prefixed name
    shareable = _shareable(graph)
    for tensor in graph.initializer:
        key = _content_key(tensor) if tensor.name in shareable else None
        if key is not None and key in shared:
            renamed[tensor.name] = shared[key]
            continue
        original = tensor.name
        tensor.name = prefix + original
        store.move(tensor)
        tensor = detached(tensor)
        if key is None:
            local.append(tensor)
        else:
            shared[key] = renamed[original] = tensor.name
            hoisted.append(tensor)
    graph_input = graph.input[0].name

    def rename(value: str) -> str:
        if value == "":
            return value  # an omitted optional input
        if value == graph_input:
            return input_name
        return renamed.get(value, prefix + value)

    nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + (node.name or node.output[0])
        copy.input[:] = [rename(v) for v in node.input]
        copy.output[:] = [rename(v) for v in node.output]
        nodes.append(copy)
    outputs, value_info = [], []
    for source, target in ((graph.output, outputs), (graph.value_info, value_info)):
        for info in source:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            copy.name = rename(info.name)
            target.append(copy)
    return helper.make_graph(nodes, name, [], outputs, initializer=local, value_info=value_info)


def switchable_model(branches: Iterable[onnx.ModelProto], sizes: Sequence[Tuple[int, int]],
                     labels: Sequence[str], input_name: str, store: ExternalTensors,
                     router: Callable[[str, Any, str], Tuple[list, list]] = onnx_route_nodes,
                     table: Any = None, extra_inputs: Sequence[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """One model routing each input to its branch: the ``i``-th of ``branches`` serves ``sizes[i]``.

    ``router(input_name, table, prefix)`` gives the nodes that compute the branch index (by
    default the classifier's rule on ``sizes``; a detector core's rule on its sides, read from one
    of ``extra_inputs``, which the assembled graph takes after the image).

    Every branch must have one input (the image) and the same outputs, as the per-scale exports of
    one architecture do; ``labels`` name the branches in the graph (``scale_<label>/...``). Branches
    are consumed one at a time (a generator keeps one in memory) and their tensor bytes moved to
    ``store``.
    """
    shared: Dict[str, str] = {}
    hoisted: List[TensorProto] = []
    subgraphs: List[onnx.GraphProto] = []
    first = None
    for model, label in zip(branches, labels):
        if len(model.graph.input) != 1 or (first is not None and len(model.graph.output) != len(first.graph.output)):
            raise ValueError("each scale's ONNX graph must have one input and the same outputs")
        if len(sizes) == 1:
            return externalized(model, store)
        subgraphs.append(_as_subgraph(model.graph, f"scale_{label}/", input_name, shared, hoisted,
                                      f"scale_{label}", store))
        if first is None:
            first = detached(model)  # its input, outputs, opset and functions describe every branch
        else:
            functions = {(f.domain, f.name, getattr(f, "overload", "")) for f in first.functions}
            first.functions.extend(f for f in model.functions
                                   if (f.domain, f.name, getattr(f, "overload", "")) not in functions)
        del model  # this branch's graph now lives in ``subgraphs``; its bytes in ``store``
    nodes, constants = router(input_name, sizes if table is None else table, ROUTE)
    output_names = [o.name for o in first.graph.output]

    def chain(i: int) -> List[onnx.NodeProto]:
        """``If index == i: branch i, else: chain(i + 1)``; the last branch closes the chain."""
        is_i = f"{ROUTE}is_{i}"
        constants.append(_int64(f"{ROUTE}branch_{i}", i))
        outs = output_names if i == 0 else [f"{ROUTE}after_{i}/{name}" for name in output_names]
        if i + 1 == len(subgraphs) - 1:
            otherwise = subgraphs[i + 1]
        else:
            inner = chain(i + 1)
            inner_outs = [helper.make_value_info(o, first.graph.output[k].type)
                          for k, o in enumerate(inner[-1].output)]
            otherwise = helper.make_graph(inner, f"{ROUTE}not_{i}", [], inner_outs)
        return [helper.make_node("Equal", [f"{ROUTE}index", f"{ROUTE}branch_{i}"], [is_i], name=is_i),
                helper.make_node("If", [is_i], outs, name=f"{ROUTE}if_{i}",
                                 then_branch=subgraphs[i], else_branch=otherwise)]

    nodes += chain(0)
    graph = helper.make_graph(nodes, "sct_switchable", [first.graph.input[0], *extra_inputs], list(first.graph.output),
                              initializer=constants + hoisted)
    graph.input[0].name = input_name
    model = helper.make_model(graph, opset_imports=list(first.opset_import), ir_version=first.ir_version,
                              producer_name="sct-convert")
    model.functions.extend(first.functions)
    return model


_PROTOBUF_LIMIT = 2**31 - 2**26  # protobuf's 2 GB message limit, with room for the graph


def _onnxruntime_reason(e: BaseException) -> str:
    """onnxruntime's innermost reason (nested If nodes repeat the outer ones first)."""
    text = " ".join(str(e).split())
    return text.rsplit("Status Message: ", 1)[-1][:300]


def will_check(probes: Sequence[Tuple[Scale, torch.Tensor]]) -> bool:
    """Whether :func:`check_runs` can run ``probes``: onnxruntime installed, numpy-held dtypes."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return bool(probes) and not any(x.dtype == torch.bfloat16 for _, x in probes)


def check_runs(path: PathLike, probes: Sequence[Tuple[Scale, torch.Tensor]],
               on_step: Callable[[str], None] = lambda label: None) -> None:
    """Run an ONNX file in onnxruntime on ``probes``; ``ValueError`` naming the scale and the fault.

    Does nothing when onnxruntime is not installed, or for inputs numpy cannot hold (bfloat16).
    """
    if not will_check(probes):
        return

    s: Any = None
    try:
        session = open_session(path, quiet=True)  # the failure is reported below, once
        for s, x in probes:  # noqa: B007 - the failing scale is named below
            session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
            on_step(f"ran scale {s} in onnxruntime")
    except Exception as e:  # noqa: BLE001 - any runtime failure refuses the file
        where = "when loading it" if s is None else f"at scale {s!r}"
        raise ValueError(
            f"the ONNX file torch.onnx produced fails in onnxruntime {where}: "
            f"{_onnxruntime_reason(e)}; nothing was written. Export another way (a per-scale file "
            "with scale=..., or sct.export_program) and report the model"
        ) from None


def write_onnx(path: PathLike, build: Callable[[ExternalTensors], onnx.ModelProto],
               props: Dict[str, str], probes: Sequence[Tuple[Scale, torch.Tensor]] = (),
               on_step: Callable[[str], None] = lambda label: None,
               verify: Callable[[Path], Dict[str, str]] = lambda path: {}) -> Path:
    """Write the model ``build(store)`` returns, with ``props`` as its metadata; its tensor bytes
    are streamed to ``store`` while it is built, so that no more than one copy of them is held.

    Up to protobuf's 2 GB limit the file is self-contained; past it the weights go to
    ``<name>.data`` beside it (ONNX external data, as ``torch.onnx`` and onnx do). Both are
    written under temporary names and renamed at the end, never half-written. Before the
    rename the file is run on ``probes`` (:func:`check_runs`): a file that fails is refused.
    ``on_step`` is told when the file is written and as each probe runs. ``verify(path)`` runs
    last, before the rename: it raises to refuse the file, or returns metadata to add to it.
    """
    path = Path(path)
    location = path.name + ".data"
    staging = staging_directory(path)
    with staging:
        store = ExternalTensors(Path(staging.name) / location, location)
        try:
            model = build(store)
        finally:
            store.close()
        gc.collect()  # the traced programs and plain copies, in reference cycles, before saving
        onnx.helper.set_model_props(model, props)
        external = store.size + model.ByteSize() > _PROTOBUF_LIMIT

        def write(tmp: str) -> None:
            if external:  # checked beside its data in the staging folder, then moved
                staged = Path(staging.name) / path.name
                staged.write_bytes(model.SerializeToString())
                on_step("written")
                check_runs(staged, probes, on_step)
                _add_props(staged, verify(staged))
                os.replace(staged, tmp)
                os.replace(store.path, path.parent / location)
            else:
                onnx.external_data_helper.load_external_data_for_model(model, staging.name)
                onnx.save_model(model, tmp)
                on_step("written")
                check_runs(tmp, probes, on_step)
                _add_props(Path(tmp), verify(Path(tmp)))

        return atomic_write(path, write)


def _add_props(path: Path, props: Dict[str, str]) -> None:
    """Add ``props`` to the metadata of the ONNX file at ``path`` (external weights left where they are)."""
    if not props:
        return
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
    path.write_bytes(model.SerializeToString())
