"""Accuracy against test size on Fashion-MNIST: plain, converted + calibrated, SCT-trained.

1. a CIFAR-style ResNet trained plainly at 32 only;
2. the same weights converted to {32, 16} and calibrated with at most 40 unlabeled batches
   of 128 training images (no labels, no gradient);
3. a branch added later at 24 and calibrated the same way ({32, 16, 24});
4. a model trained with SCT at {32, 16} (drop-in loop), same epochs and schedule.
Sizes between trained scales use the default routing (nearest branch by pixel count).
Writes a JSON table, a PNG plot, and the branch-divergence plot of the SCT model.

    python benchmarks/resolution_sweep.py --epochs 3              # CPU, ~20 min on 2 cores
    python benchmarks/resolution_sweep.py --device cuda --epochs 15
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import fashion_mnist  # noqa: E402
from fmnist_sct import evaluate, train_arm  # noqa: E402

import sct_convert as sct  # noqa: E402
from sct_convert.training.diagnostics import branch_divergence  # noqa: E402

SIZES = list(range(16, 33, 2))


def unlabeled(x_train, batches, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_train), generator=g)[: batches * batch_size].to(x_train.device)
    return [x_train[order[i * batch_size:(i + 1) * batch_size]] for i in range(batches)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=40)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="sct_convert: input size")
    x_train, y_train = fashion_mnist.load("train", args.device)
    x_test, y_test = fashion_mnist.load("test", args.device)
    data = (x_train, y_train, x_test, y_test)
    out = Path(args.out_dir)
    results, timings = {}, {}

    plain, _, timings["train plain@32 s"] = train_arm([32], args, args.seed, data)
    results["plain@32"] = evaluate(plain, x_test, y_test, SIZES)
    print("plain@32      ", results["plain@32"], flush=True)

    calib = unlabeled(x_train, args.calib_batches, args.batch_size, args.seed)
    converted = sct.convert(copy.deepcopy(plain), [32, 16])
    t = time.time()
    sct.calibrate(converted, calib, num_batches=args.calib_batches, progress=False)
    timings["calibrate {32,16} s"] = time.time() - t
    results["converted+calibrated {32,16}"] = evaluate(converted, x_test, y_test, SIZES)
    print("calib {32,16} ", results["converted+calibrated {32,16}"], flush=True)

    sct.add_scale(converted, 24)
    sct.calibrate(converted, calib, num_batches=args.calib_batches, scales=[24], progress=False)
    results["converted+calibrated {32,16,24}"] = evaluate(converted, x_test, y_test, SIZES)
    print("calib +24     ", results["converted+calibrated {32,16,24}"], flush=True)

    sct_model, _, timings["train sct@{32,16} s"] = train_arm([32, 16], args, args.seed, data)
    results["SCT-trained {32,16}"] = evaluate(sct_model, x_test, y_test, SIZES)
    print("SCT {32,16}   ", results["SCT-trained {32,16}"], flush=True)

    rows = branch_divergence(sct_model, plot=str(out / "branch_divergence.png"))
    div = [r["divergence"] for r in rows]
    half = len(div) // 2
    trend = {"first_half_mean": sum(div[:half]) / half, "second_half_mean": sum(div[half:]) / (len(div) - half),
             "last_layer": div[-1], "first_layer": div[0]}

    print(f"\n{'size':>5s} " + " ".join(f"{k[:22]:>22s}" for k in results))
    for size in SIZES:
        print(f"{size:5d} " + " ".join(f"{results[k][size]:22.2f}" for k in results))
    print("branch divergence (SCT model, symmetric KL):", {k: round(v, 4) for k, v in trend.items()})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, acc in results.items():
        ax.plot(SIZES, [acc[s] for s in SIZES], marker="o", label=name)
    ax.set_xlabel("test size (pixels)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Fashion-MNIST, ResNet-{args.depth}, {args.epochs} epochs")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "resolution_sweep.png", dpi=120)
    (out / "resolution_sweep.json").write_text(json.dumps({
        "settings": {**vars(args), "torch": torch.__version__,
                     "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "accuracy": results, "timings_s": timings, "divergence_trend": trend,
        "divergence_rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
