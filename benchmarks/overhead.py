"""Inference overhead of a converted model: converted / original and extracted / original latency.

Eval mode, no grad, batch 8 by default. Each repeat times the three models back to back in a
rotating order (paired, interleaved), and the table reports the median of the per-repeat
ratios, so drifting clocks and background load hit all three alike. Also times convert().

    python benchmarks/overhead.py                       # CPU
    python benchmarks/overhead.py --device cuda --repeats 200
    python benchmarks/overhead.py --batch 1 --scales 64,48,32 --threads 1 --repeats 200  # CPU, Python-bound

--shell adds a fourth model, the converted model with each S-BN layer replaced by its branch for
the timed scale (a plain BN): shell/orig is the cost of the converted model's own forward (entry
routing, the routed call), conv/shell that of the S-BN layers.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import sct_convert as sct
from sct_convert.core.scales import scale_key

MODELS = ["resnet50", "mobilenetv3_large_100"]
SCALES = [224, 192, 128]


def timer(device: str):
    if device.startswith("cuda"):
        def run(fn, x):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn(x)
            torch.cuda.synchronize()
            return time.perf_counter() - t
    else:
        def run(fn, x):
            t = time.perf_counter()
            fn(x)
            return time.perf_counter() - t
    return run


def plain_bn_shell(converted: torch.nn.Module, scale: int) -> torch.nn.Module:
    """A copy of ``converted`` whose S-BN layers are replaced by their branch for ``scale``."""
    shell = copy.deepcopy(converted)
    key = scale_key(scale)
    for name, module in list(shell.named_modules()):
        if isinstance(module, sct.ScaleSpecificBatchNorm):
            shell.set_submodule(name, module.branches[key])
    return shell


def convert_seconds(name: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        model = timm.create_model(name, pretrained=False)
        t = time.perf_counter()
        sct.convert(model, SCALES)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scales", default=",".join(map(str, SCALES)),
                   help="tiny sizes at batch 1 make a CPU run Python-bound, like small GPU batches")
    p.add_argument("--convert-only", action="store_true", help="only time convert()")
    p.add_argument("--shell", action="store_true",
                   help="also time the converted model with plain BN layers put back (shell/orig)")
    args = p.parse_args()
    scales = [int(v) for v in args.scales.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    run = timer(args.device)
    print(f"device={args.device} batch={args.batch} repeats={args.repeats} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    if not args.convert_only:
        print(f"{'model':24s} {'scale':>5s} {'orig ms':>9s} {'conv/orig':>9s} {'extr/orig':>9s}"
              + (f" {'shell/orig':>10s}" if args.shell else ""))
    for name in args.models.split(",") if not args.convert_only else []:
        torch.manual_seed(0)
        original = timm.create_model(name, pretrained=False).eval()
        converted = sct.convert(copy.deepcopy(original), scales).eval()
        original, converted = original.to(args.device), converted.to(args.device)
        for s in scales:
            extracted = sct.extract(converted, s).eval().to(args.device)
            x = torch.randn(args.batch, 3, s, s, device=args.device)
            models = [original, converted, extracted]
            if args.shell:
                models.append(plain_bn_shell(converted, s).eval())
            n = len(models)
            with torch.inference_mode():
                for _ in range(args.warmup):
                    for m in models:
                        m(x)
                ratios, base = [[] for _ in range(n)], []
                for r in range(args.repeats):
                    order = [(r + i) % n for i in range(n)]
                    t = [0.0] * n
                    for i in order:
                        t[i] = run(models[i], x)
                    base.append(t[0])
                    for i in range(n):
                        ratios[i].append(t[i] / t[0])
            medians = [statistics.median(v) for v in ratios]
            line = f"{name:24s} {s:5d} {1000 * statistics.median(base):9.2f} {medians[1]:9.3f} {medians[2]:9.3f}"
            print(line + (f" {medians[3]:10.3f}" if args.shell else ""), flush=True)
    for name in args.models.split(","):
        print(f"convert({name}) at {SCALES}: {convert_seconds(name):.3f} s (median of 5, CPU model)")


if __name__ == "__main__":
    main()
