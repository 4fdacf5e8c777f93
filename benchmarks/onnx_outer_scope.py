"""Does onnxruntime run an op under ``If`` as fast when its weight lives in the main graph?

The switchable ONNX file shares a tensor between branches by keeping it in the main graph, where
each ``If`` branch reads it from the outer scope. This measures, for one op under ``If``, the
weight inside the branch (as a per-scale file has it) against the weight in the main graph, with
onnxruntime CPU, paired and interleaved, median of the per-repeat ratios outer / local:

- ``Gemm`` (a classifier head): shared in the switchable file;
- ``Conv`` 3x3 without BN after it (squeeze-excite, pre-activation nets): kept in the branch,
  because onnxruntime's NCHWc layout transform only rewrites weights of its own graph;
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
    if case == "gemm":
        return {"w": rng.standard_normal((width, width), dtype=np.float32) * 0.01,
                "b": rng.standard_normal(width, dtype=np.float32)}
    w = {"w": rng.standard_normal((width, width, 3, 3), dtype=np.float32) * 0.01,
         "b": rng.standard_normal(width, dtype=np.float32)}
    if case == "conv_bn":
        w.update(gamma=rng.random(width, dtype=np.float32) + 0.5, beta=rng.standard_normal(width, dtype=np.float32),
                 mean=rng.standard_normal(width, dtype=np.float32), var=rng.random(width, dtype=np.float32) + 0.5)
    return w


def model(case: str, weights: dict, outer: bool, x_shape: list) -> onnx.ModelProto:
    """``If (true) {op} else {op}``; the op's tensors in each branch or once in the main graph."""
    def tensors(prefix: str) -> list:
        return [numpy_helper.from_array(v, prefix + k) for k, v in weights.items()]

    def branch(name: str) -> onnx.GraphProto:
        prefix = "" if outer else name + "/"
        nodes = op_nodes(case, prefix, name + "/")
        out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [out], initializer=[] if outer else tensors(prefix))

    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]  # an input: no folding of If
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
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
    print(f"{'op':10s} {'shape':18s} {'batch':>5s} {'local ms':>9s} {'outer/local':>11s}")
    rng = np.random.default_rng(0)
    cases = (("gemm", 2048, lambda b: [b, 2048]), ("conv", 128, lambda b: [b, 128, 28, 28]),
             ("conv_bn", 128, lambda b: [b, 128, 28, 28]))
    with tempfile.TemporaryDirectory() as tmp:
        for case, width, shape in cases:
            weights = weights_of(case, width, rng)
            for batch in [int(b) for b in args.batches.split(",")]:
                runs = []
                for outer in (False, True):
                    path = Path(tmp) / f"{case}_{outer}.onnx"
                    onnx.save(model(case, weights, outer, shape(batch)), path)
                    options = ort.SessionOptions()
                    options.intra_op_num_threads = args.threads
                    options.inter_op_num_threads = 1
                    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    runs.append(session)
                feed = {"x": rng.standard_normal(shape(batch), dtype=np.float32), "cond": np.array(True)}
                got = [s.run(None, feed)[0] for s in runs]
                assert np.allclose(got[0], got[1], rtol=1e-4, atol=1e-4), case
                for _ in range(5):
                    for s in runs:
                        s.run(None, feed)
                local, ratios = [], []
                for r in range(args.repeats):
                    t = [0.0, 0.0]
                    for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                        start = time.perf_counter()
                        runs[i].run(None, feed)
                        t[i] = time.perf_counter() - start
                    local.append(t[0])
                    ratios.append(t[1] / t[0])
                print(f"{case:10s} {'x'.join(map(str, shape(batch))):18s} {batch:5d} "
                      f"{statistics.median(local) * 1e3:9.3f} {statistics.median(ratios):11.3f}", flush=True)


if __name__ == "__main__":
    main()
