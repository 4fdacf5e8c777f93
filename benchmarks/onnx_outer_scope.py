"""Does onnxruntime run an op under ``If`` as fast when its weight lives in the main graph?

The switchable ONNX file shares a tensor between branches by keeping it in the main graph, where
each ``If`` branch reads it from the outer scope. This measures, for one op under ``If``, the
weight inside the branch (as a per-scale file has it) against the weight in the main graph, with
onnxruntime CPU, paired and interleaved, median of the per-repeat ratios outer / local:

- ``Gemm`` (classifier heads): kept in the branch (slower from the main graph at depth 2);
- ``Conv`` 3x3 without BN after it (squeeze-excite, pre-activation nets): kept in the branch
  (from the main graph it misses onnxruntime's NCHWc layout);
- ``Conv`` + ``BatchNormalization``: shared; the runtime folds BN into a new weight in the branch.

    python benchmarks/onnx_outer_scope.py --threads 1 --repeats 200
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def op_nodes(case: str, weight: str, out: str) -> list:
    """The op reading ``x``; its tensors are named ``weight + "w"`` etc., its values ``out + ...``."""
    if case == "gemm":
        return [helper.make_node("Gemm", ["x", weight + "w", weight + "b"], [out + "y"], transB=1)]
    conv_out = out + ("c" if case == "conv_bn" else "y")
    nodes = [helper.make_node("Conv", ["x", weight + "w", weight + "b"], [conv_out], pads=[1, 1, 1, 1])]
    if case == "conv_bn":
        nodes.append(helper.make_node("BatchNormalization", [conv_out] + [weight + k for k in
                                      ("gamma", "beta", "mean", "var")], [out + "y"]))
    return nodes


def weights_of(case: str, width: int, rng) -> dict:
    if case == "gemm":  # width = (in, out)
        return {"w": rng.standard_normal(width[::-1], dtype=np.float32) * 0.01,
                "b": rng.standard_normal(width[1], dtype=np.float32)}
    w = {"w": rng.standard_normal((width, width, 3, 3), dtype=np.float32) * 0.01,
         "b": rng.standard_normal(width, dtype=np.float32)}
    if case == "conv_bn":
        w.update(gamma=rng.random(width, dtype=np.float32) + 0.5, beta=rng.standard_normal(width, dtype=np.float32),
                 mean=rng.standard_normal(width, dtype=np.float32), var=rng.random(width, dtype=np.float32) + 0.5)
    return w


def model(case: str, weights: dict, outer: bool, x_shape: list, nested: bool) -> onnx.ModelProto:
    """``If (cond) {op} else {op}`` or, nested, ``If (cond) {op} else {If (cond) {op} else {op}}``
    as the switchable file chains them; the op's tensors in each branch or once in the main graph.
    Fed ``cond = False`` the op runs at depth 1 or 2."""
    def tensors(prefix: str) -> list:
        return [numpy_helper.from_array(v, prefix + k) for k, v in weights.items()]

    def branch(name: str) -> onnx.GraphProto:
        prefix = "" if outer else name + "/"
        nodes = op_nodes(case, prefix, name + "/")
        out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [out], initializer=[] if outer else tensors(prefix))

    def chain(names: list, out: str) -> onnx.NodeProto:
        otherwise = (branch(names[1]) if len(names) == 2 else
                     helper.make_graph([chain(names[1:], "inner_y")], "not_" + names[0], [],
                                       [helper.make_tensor_value_info("inner_y", TensorProto.FLOAT, None)]))
        return helper.make_node("If", ["cond"], [out], then_branch=branch(names[0]), else_branch=otherwise)

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]  # an input: no folding of If
    graph = helper.make_graph([chain(["a", "b", "c"] if nested else ["a", "b"], "y")], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=tensors("") if outer else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args()
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__} CPU threads={args.threads} repeats={args.repeats}")
    print(f"{'op':10s} {'input':18s} {'weight':16s} {'local ms':>9s} {'outer/local':>11s} "
          f"{'nested: outer/local':>19s}")
    rng = np.random.default_rng(0)
    cases = (("gemm", (1280, 1000), lambda b: [b, 1280]),  # MobileNetV3's classifier
             ("gemm", (2048, 1000), lambda b: [b, 2048]),  # ResNet-50's
             ("gemm", (4096, 4096), lambda b: [b, 4096]),  # VGG's
             ("conv", 128, lambda b: [b, 128, 28, 28]),
             ("conv_bn", 128, lambda b: [b, 128, 28, 28]))
    with tempfile.TemporaryDirectory() as tmp:
        for case, width, shape in cases:
            weights = weights_of(case, width, rng)
            for batch in [int(b) for b in args.batches.split(",")]:
                runs = []  # (local, outer) at depth 1, then at depth 2
                for nested in (False, True):
                    for outer in (False, True):
                        path = Path(tmp) / f"{case}_{outer}_{nested}.onnx"
                        onnx.save(model(case, weights, outer, shape(batch), nested), path)
                        options = ort.SessionOptions()
                        options.intra_op_num_threads = args.threads
                        options.inter_op_num_threads = 1
                        runs.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
                feed = {"x": rng.standard_normal(shape(batch), dtype=np.float32), "cond": np.array(False)}
                got = [s.run(None, feed)[0] for s in runs]
                assert all(np.allclose(got[0], g, rtol=1e-4, atol=1e-4) for g in got), case
                for _ in range(5):
                    for s in runs:
                        s.run(None, feed)
                times = [[] for _ in runs]
                for r in range(args.repeats):
                    for i in (range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))):
                        start = time.perf_counter()
                        runs[i].run(None, feed)
                        times[i].append(time.perf_counter() - start)
                ratio = [statistics.median(o / loc for o, loc in zip(times[k + 1], times[k])) for k in (0, 2)]
                print(f"{case:10s} {'x'.join(map(str, shape(batch))):18s} {'x'.join(map(str, weights['w'].shape)):16s} "
                      f"{statistics.median(times[0]) * 1e3:9.3f} {ratio[0]:11.3f} {ratio[1]:19.3f}", flush=True)


if __name__ == "__main__":
    main()
