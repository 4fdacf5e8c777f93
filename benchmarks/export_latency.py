"""onnxruntime latency: one switchable ONNX file vs the static per-scale files, at each scale.

For each model, exports the converted model once as a switchable file (every scale, routed in
the graph) and once per scale as a static plain file, then times both in onnxruntime (CPU) at
each scale and batch size, paired and interleaved in one run (the two sessions alternate
first), and prints the median of the per-repeat ratios switchable / static. A third column times one
branch of the switchable file saved on its own (the same graph, dynamic height and width, no
``If``), which tells the cost of the dynamic size from the cost of running under ``If``.

    python benchmarks/export_latency.py                       # resnet50, mobilenetv3_large_100
    python benchmarks/export_latency.py --threads 1 --repeats 100   # steadier on a shared VM
    python benchmarks/export_latency.py --models resnet18 --repeats 50 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import timm
import torch

import sct_convert as sct
from sct_convert.deploy.api import onnx_branches
from sct_convert.deploy.onnx_trace import DEFAULT_OPSET


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,mobilenetv3_large_100")
    p.add_argument("--scales", default="224,192,128")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    scales = [int(s) for s in args.scales.split(",")]
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__} CPU threads={args.threads} repeats={args.repeats} "
          f"torch={torch.__version__}")
    print(f"{'model':24s} {'scale':>5s} {'batch':>5s} {'static ms':>10s} {'switch/static':>13s} "
          f"{'branch/static':>13s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = sct.convert(timm.create_model(name), scales).eval()
            switchable_path = sct.export_onnx(model, Path(tmp) / f"{name}.onnx")
            switchable = session(switchable_path, args.threads)
            branches = onnx_branches(model, DEFAULT_OPSET, None)
            for s, branch_proto in zip(scales, branches):
                static_path = sct.export_onnx(model, Path(tmp) / f"{name}_{s}.onnx", scale=s)
                static = session(static_path, args.threads)
                onnx.save(branch_proto, Path(tmp) / f"{name}_{s}_branch.onnx")
                branch = session(Path(tmp) / f"{name}_{s}_branch.onnx", args.threads)
                for batch in [int(b) for b in args.batches.split(",")]:
                    x = np.random.default_rng(0).standard_normal((batch, 3, s, s), dtype=np.float32)
                    runs = (static, switchable, branch)
                    for _ in range(args.warmup):
                        for run in runs:
                            run(x)
                    base, ratios, branch_ratios = [], [], []
                    for r in range(args.repeats):
                        t = [0.0, 0.0, 0.0]
                        for i in ((0, 1, 2) if r % 2 == 0 else (2, 1, 0)):
                            start = time.perf_counter()
                            runs[i](x)
                            t[i] = time.perf_counter() - start
                        base.append(t[0])
                        ratios.append(t[1] / t[0])
                        branch_ratios.append(t[2] / t[0])
                    print(f"{name:24s} {s:5d} {batch:5d} {1000 * statistics.median(base):10.2f} "
                          f"{statistics.median(ratios):13.3f} {statistics.median(branch_ratios):13.3f}", flush=True)
            mb = [f.stat().st_size / 2**20 for f in (switchable_path, static_path)]
            print(f"{name}: switchable file {mb[0]:.1f} MB, per-scale file {mb[1]:.1f} MB ({mb[0] / mb[1]:.2f}x)")


if __name__ == "__main__":
    main()
