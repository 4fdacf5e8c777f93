"""One ONNX graph that serves every scale, assembled from the per-scale graphs.

Each scale's plain model is exported on its own (dynamic batch, height and width, BN not folded).
The assembled graph computes the branch index from the input's shape (``Shape``, exact ``(h, w)``
match first, else ``ArgMin`` over the pixel-count gap, as eager routing does) and runs that
scale's graph under a chain of ``If`` nodes. The tensors that every branch reads unchanged (the
weights of convs followed by BN, of Gemm and MatMul) live once in the main graph, deduplicated
by content, so the file is about the size of one scale's for a ResNet; the rest (BN statistics,
weights of convs without BN) stays in its branch, where onnxruntime's layout transforms can
rewrite it. Each branch's BN statistics are constants of its own subgraph, so runtimes fold them
into the convs at load (onnxruntime does, per branch): the switchable file runs as fast as a
per-scale file, at the cost of one folded copy of the conv weights per scale in memory.

Needs ``onnx``; callers check the ``[onnx]`` extra first.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROUTE = "sct_route/"


def _content_key(tensor: TensorProto) -> str:
    data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    digest = hashlib.sha256(data)
    digest.update(repr((tensor.data_type, tuple(tensor.dims))).encode())
    return digest.hexdigest()


def _int64(name: str, values) -> TensorProto:
    array = np.asarray(values, dtype=np.int64)
    return numpy_helper.from_array(array, name)


def _routing_nodes(input_name: str, sizes: Sequence[Tuple[int, int]]) -> Tuple[List[onnx.NodeProto], List[TensorProto]]:
    """Nodes computing ``sct_route/index`` (0-d int64): exact size first, else nearest by pixels."""
    r = ROUTE
    heights = [h for h, _ in sizes]
    widths = [w for _, w in sizes]
    constants = [
        _int64(r + "heights", heights), _int64(r + "widths", widths),
        _int64(r + "pixels", [h * w for h, w in sizes]),
        _int64(r + "h_axis", [2]), _int64(r + "w_axis", [3]), _int64(r + "exact_score", [-1]),
    ]
    nodes = [
        helper.make_node("Shape", [input_name], [r + "shape"], name=r + "shape"),
        helper.make_node("Gather", [r + "shape", r + "h_axis"], [r + "h"], axis=0, name=r + "h"),
        helper.make_node("Gather", [r + "shape", r + "w_axis"], [r + "w"], axis=0, name=r + "w"),
        helper.make_node("Mul", [r + "h", r + "w"], [r + "hw"], name=r + "hw"),
        helper.make_node("Sub", [r + "pixels", r + "hw"], [r + "diff"], name=r + "diff"),
        helper.make_node("Abs", [r + "diff"], [r + "gap"], name=r + "gap"),
        helper.make_node("Equal", [r + "heights", r + "h"], [r + "same_h"], name=r + "same_h"),
        helper.make_node("Equal", [r + "widths", r + "w"], [r + "same_w"], name=r + "same_w"),
        helper.make_node("And", [r + "same_h", r + "same_w"], [r + "exact"], name=r + "exact"),
        helper.make_node("Where", [r + "exact", r + "exact_score", r + "gap"], [r + "score"], name=r + "score"),
        helper.make_node("ArgMin", [r + "score"], [r + "index"], axis=0, keepdims=0, name=r + "index"),
    ]
    return nodes, constants


def _shareable(graph: onnx.GraphProto) -> Set[str]:
    """Initializers that branches can read from the main graph without slowing the runtime.

    Those that only feed a Conv followed by a BatchNormalization (the runtime folds each branch's
    BN into the conv, writing a new weight inside the branch, so the shared tensor is only read at
    load) or the weights of a Gemm / MatMul (measured: as fast from the outer scope). Any other
    tensor stays inside its branch: onnxruntime's NCHWc layout transform only rewrites weights of
    the graph its conv lives in, so a conv without BN (MobileNetV3's squeeze-excite and head)
    reading a weight of the main graph stays on the slow path (1.36x at batch 1, 128 px).
    """
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, value in enumerate(node.input):
            consumers.setdefault(value, []).append((node, i))

    def read_as_is(node: onnx.NodeProto, i: int) -> bool:
        if node.op_type in ("Gemm", "MatMul"):
            return i >= 1
        after = consumers.get(node.output[0], [])
        return (node.op_type == "Conv" and i in (1, 2) and len(after) == 1
                and after[0][0].op_type == "BatchNormalization" and after[0][1] == 0)

    return {t.name for t in graph.initializer
            if consumers.get(t.name) and all(read_as_is(n, i) for n, i in consumers[t.name])}


def _as_subgraph(graph: onnx.GraphProto, prefix: str, input_name: str, shared: Dict[str, str],
                 hoisted: Dict[str, TensorProto], name: str) -> onnx.GraphProto:
    """``graph`` as an ``If`` branch: no inputs (it reads ``input_name`` from the outer scope), its
    shareable initializers moved to the main graph (``hoisted``, deduplicated by content), every
    other name prefixed so that no two branches collide."""
    renamed: Dict[str, str] = {}
    local: List[TensorProto] = []  # stays in the branch, under its prefixed name
    shareable = _shareable(graph)
    for tensor in graph.initializer:
        key = _content_key(tensor) if tensor.name in shareable else None
        if key is not None and key in shared:
            renamed[tensor.name] = shared[key]
            continue
        copy = TensorProto()
        copy.CopyFrom(tensor)
        copy.name = prefix + tensor.name
        if key is None:
            local.append(copy)
        else:
            shared[key] = copy.name
            hoisted[copy.name] = copy
            renamed[tensor.name] = copy.name
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


def switchable_model(branches: Sequence[onnx.ModelProto], sizes: Sequence[Tuple[int, int]],
                     labels: Sequence[str], input_name: str) -> onnx.ModelProto:
    """One model routing each input to its branch: ``branches[i]`` serves ``sizes[i]``.

    Every branch must have one input (the image) and the same outputs, as the per-scale exports of
    one architecture do; ``labels`` name the branches in the graph (``scale_<label>/...``).
    """
    first = branches[0]
    if len(branches) == 1:
        return first
    for model in branches:
        if len(model.graph.input) != 1 or len(model.graph.output) != len(first.graph.output):
            raise ValueError("each scale's ONNX graph must have one input and the same outputs")
    shared: Dict[str, str] = {}
    hoisted: Dict[str, TensorProto] = {}
    subgraphs = [_as_subgraph(m.graph, f"scale_{label}/", input_name, shared, hoisted, f"scale_{label}")
                 for m, label in zip(branches, labels)]
    nodes, constants = _routing_nodes(input_name, sizes)
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
    graph = helper.make_graph(nodes, "sct_switchable", [first.graph.input[0]], list(first.graph.output),
                              initializer=constants + list(hoisted.values()))
    graph.input[0].name = input_name
    model = helper.make_model(graph, opset_imports=list(first.opset_import), ir_version=first.ir_version,
                              producer_name="sct-convert")
    functions = {}
    for branch in branches:
        for f in branch.functions:
            functions.setdefault((f.domain, f.name, getattr(f, "overload", "")), f)
    model.functions.extend(functions.values())
    return model
