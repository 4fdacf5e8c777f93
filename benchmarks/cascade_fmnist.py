"""Cascades on Fashion-MNIST: top-1 against MACs for single scales and fitted cascades, and wall-clock.

ResNet-20 (Fashion-MNIST padded to 32x32) trained three ways, each seed:
- ``sct@32,16`` and ``sct@32,24,16``: SCT training (convert + SCTLoss, as benchmarks/fmnist_sct.py);
- ``plain@32+cal``: plain training at 32, then converted at {32, 24, 16} and calibrated on 2,000
  training images (what a user with an already trained model gets).

The test set is split in two seeded halves: cascades are fitted (``sct.fit_cascade``,
``max_drop`` 0, 0.3, 0.5, 1.0) on one and every figure is reported on the other. MACs come from
``torch.utils.flop_counter`` and are relative to one pass at 32. For the first seed of each arm
the cascade fitted at ``max_drop`` 0.5 is also timed against the largest scale alone, in turns,
median of repeats: eager CPU at batch 1 and batch 64, and onnxruntime through
``sct_convert.runtime.CascadeSession`` against the same file run at 32.

    python benchmarks/cascade_fmnist.py                                   # CPU preset (below)
    python benchmarks/cascade_fmnist.py --device cuda --epochs 15 --train-images 60000  # the full presets
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import fashion_mnist  # noqa: E402
from fmnist_sct import train_arm  # noqa: E402

import sct_convert as sct  # noqa: E402
from sct_convert.serving.cascade import count_macs  # noqa: E402

ARMS = {"sct@32,16": [32, 16], "sct@32,24,16": [32, 24, 16], "plain@32+cal": [32]}
DROPS = (0.0, 0.3, 0.5, 1.0)


def batches(x, y, size=500):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def top1(logits, y):
    return 100.0 * (logits.argmax(1) == y).double().mean().item()


def interleaved(calls, repeats):
    """Median seconds of each call, timed in turns (order reversed every other round)."""
    for call in calls:
        call()
    times = [[] for _ in calls]
    for r in range(repeats):
        for i in (range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))):
            start = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def timings(model, cascade, x, repeats):
    """Per-image ms of the largest scale alone and of the cascade: eager at batch 1 and 64, and
    onnxruntime (the cascade's ONNX file through the runtime, and that file at 32)."""
    import numpy as np

    def largest(batch):
        with torch.no_grad(), sct.scale(model, 32):
            return model(batch)

    out = {}
    for b in (1, 64):
        xs = [x[i:i + b] for i in range(0, b * 16, b)]
        plain_s, cascade_s = interleaved([functools.partial(lambda vs: [largest(v) for v in vs], xs),
                                          functools.partial(lambda vs: [cascade(v) for v in vs], xs)], repeats)
        out[f"eager b{b}"] = (1000 * plain_s / (16 * b), 1000 * cascade_s / (16 * b))
    try:
        import onnxruntime as ort

        from sct_convert.runtime import CascadeSession
    except ImportError:
        return out
    with tempfile.TemporaryDirectory() as d:
        path = sct.export_onnx(cascade, Path(d) / "cascade.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        runtime = CascadeSession(str(path), options=options)
        session = runtime.session
        for b in (1, 64):
            xs = [np.ascontiguousarray(x[i:i + b].numpy()) for i in range(0, b * 16, b)]
            whole = functools.partial(lambda vs: [session.run(None, {"images": v}) for v in vs], xs)
            tiered = functools.partial(lambda vs: [runtime.run(v) for v in vs], xs)
            plain_s, cascade_s = interleaved([whole, tiered], repeats)
            out[f"onnxruntime b{b}"] = (1000 * plain_s / (16 * b), 1000 * cascade_s / (16 * b))
    return out


def one_run(arm, scales, args, seed, data, fit, report):
    """Train (or train + calibrate) one model; its single-scale and cascade points on ``report``."""
    model, _, secs = train_arm(scales, args, seed, data)
    if len(scales) == 1:  # plain: convert and calibrate, as a user with a trained model would
        model = sct.convert(model, [32, 24, 16])
        x_cal = data[0][:2000]
        sct.calibrate(model, [x_cal[i:i + 500] for i in range(0, 2000, 500)], num_batches=4, progress=False)
    model.eval()
    x_fit, y_fit = fit
    x_rep, y_rep = report
    full = count_macs(model, (32, 32))
    points = {"train_seconds": round(secs, 1), "single": {}, "cascade": {}}
    for s in sct.scales_of(model):
        with torch.no_grad(), sct.scale(model, s):
            logits = torch.cat([model(sct.resize_to(xb, (s, s))) for xb, _ in batches(x_rep, y_rep)])
        points["single"][str(s)] = (top1(logits, y_rep), count_macs(model, (s, s)) / full)
    fitted = {}
    for drop in DROPS:
        cascade = sct.fit_cascade(model, batches(x_fit, y_fit), max_drop=drop)
        with torch.no_grad():
            result = [cascade.run(xb) for xb, _ in batches(x_rep, y_rep)]
        logits = torch.cat([r.logits for r in result])
        macs = torch.cat([r.macs for r in result]).double().mean().item() / full
        answered = torch.cat([r.scales for r in result])
        points["cascade"][str(drop)] = {
            "top1": top1(logits, y_rep), "relative_macs": macs,
            "thresholds": {str(k): v for k, v in cascade.thresholds.items()},
            "answered": {str(s): float((answered == s).double().mean()) for s in cascade.thresholds}}
        fitted[drop] = cascade
    if seed == args.seeds_list[0]:
        points["latency_ms"] = timings(model, fitted[0.5], x_rep, args.repeats)
    return points


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=10000, help="train on the first N training images")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per latency cell")
    p.add_argument("--arms", default=";".join(ARMS), help="semicolon-separated")
    p.add_argument("--out", default="benchmarks/results/cascade_fmnist.json")
    p.add_argument("--plot", default="docs/figures/cascade_fmnist.png")
    args = p.parse_args()
    args.seeds_list = [int(s) for s in args.seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    x_train, y_train = fashion_mnist.load("train", args.device)
    x_train, y_train = x_train[:args.train_images], y_train[:args.train_images]
    x_test, y_test = fashion_mnist.load("test", args.device)
    data = (x_train, y_train, x_test, y_test)
    order = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(123))
    fit = (x_test[order[:5000]], y_test[order[:5000]])
    report = (x_test[order[5000:]], y_test[order[5000:]])
    results = {"settings": {k: v for k, v in vars(args).items()}, "torch": torch.__version__, "arms": {}}
    for arm in args.arms.split(";"):
        runs = results["arms"].setdefault(arm, {})
        for seed in args.seeds_list:
            runs[str(seed)] = one_run(arm, ARMS[arm], args, seed, data, fit, report)
            r = runs[str(seed)]
            print(f"{arm} seed {seed}: " + ", ".join(f"{s}: {a:.2f}% {m:.2f}x" for s, (a, m) in r["single"].items())
                  + " | cascades " + ", ".join(f"{d}: {c['top1']:.2f}% {c['relative_macs']:.3f}x"
                                               for d, c in r["cascade"].items()), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    if args.plot:
        plot(results, args.plot)


def print_table(results):
    print("\nmean over seeds, on the report half of the test set (MACs relative to one pass at 32)")
    print(f"{'arm':14s} {'point':18s} {'top-1 %':>8s} {'MACs':>6s}")
    for arm, runs in results["arms"].items():
        seeds = list(runs.values())
        for s in seeds[0]["single"]:
            acc = statistics.mean(r["single"][s][0] for r in seeds)
            print(f"{arm:14s} {'scale ' + s:18s} {acc:8.2f} {seeds[0]['single'][s][1]:6.3f}")
        for d in seeds[0]["cascade"]:
            acc = statistics.mean(r["cascade"][d]["top1"] for r in seeds)
            macs = statistics.mean(r["cascade"][d]["relative_macs"] for r in seeds)
            print(f"{arm:14s} {'cascade drop ' + d:18s} {acc:8.2f} {macs:6.3f}")
        for cell, (largest, cascade) in seeds[0].get("latency_ms", {}).items():
            print(f"{arm:14s} {cell:18s} largest {largest:.3f} ms/image, cascade {cascade:.3f} "
                  f"({cascade / largest:.2f}x)")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in results["arms"].items():
        seeds = list(runs.values())
        singles = list(seeds[0]["single"])
        xs = [seeds[0]["single"][s][1] for s in singles]
        ys = [statistics.mean(r["single"][s][0] for r in seeds) for s in singles]
        line = ax.plot(xs, ys, "o", label=f"{arm} single scales")[0]
        drops = list(seeds[0]["cascade"])
        cx = [statistics.mean(r["cascade"][d]["relative_macs"] for r in seeds) for d in drops]
        cy = [statistics.mean(r["cascade"][d]["top1"] for r in seeds) for d in drops]
        ax.plot(cx, cy, "s-", color=line.get_color(), label=f"{arm} cascades")
    ax.set(xlabel="MACs per image / one pass at 32", ylabel="top-1 (%)", title="Fashion-MNIST ResNet-20: cascades")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
