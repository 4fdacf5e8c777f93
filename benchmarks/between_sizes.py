"""Sizes between the trained scales: nearest branch, interpolated BN, or a branch calibrated there.

S-BN ResNet-20s are trained on Fashion-MNIST (the CPU preset of ``reproduce.py``: 3 epochs on
5,632 images, SGD + cosine) at {32, 16} and {32, 24, 16}, each with and without in-between
sampling (``sct.set_sampling(model, between=True)``: every step also runs one random size
between 16 and 32; those arms are converted with ``unknown_scale="interpolate"``, so that size
trains the blend of its two bracketing branches). Every model is then tested at every size from
16 to 32 three ways:

    nearest      the branch of the nearest trained scale (``unknown_scale="nearest"``)
    interpolate  BN tensors blended in pixel count between the two bracketing branches
                 (``unknown_scale="interpolate"``)
    calibrated   a branch added at that size (``sct.add_scale``) and calibrated on unlabeled
                 training batches (``sct.calibrate``, 10 batches of 128)

Jobs (arm x seed) are appended to a JSONL file as they finish and skipped on a rerun.

    python benchmarks/between_sizes.py                 # 4 arms x 3 seeds, ~40 min on 2 cores
    python benchmarks/between_sizes.py --report-only   # table (mean ± SE) and plot from the JSONL
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import reproduce  # noqa: E402  (train, accuracy, data and calibration helpers)
from _host import write_atomic  # noqa: E402

import sct_convert as sct  # noqa: E402

SIZES = list(range(16, 33))
ARMS = {
    "s-bn@32/16": dict(scales=[32, 16]),
    "s-bn@32/16+between": dict(scales=[32, 16], between=True, unknown_scale="interpolate"),
    "s-bn@32/24/16": dict(scales=[32, 24, 16]),
    "s-bn@32/24/16+between": dict(scales=[32, 24, 16], between=True, unknown_scale="interpolate"),
}
SERVING = ("nearest", "interpolate", "calibrated")
SETTINGS = dict(epochs=3, limit=5632, test_limit=1000, calib_batches=10, batch_size=128, lr=0.1,
                schedule="cosine", device="cpu")


def served(model, size: int, how: str, calib, x_test, y_test) -> float:
    ctx = sct.context_of(model)
    if how == "calibrated" and (size, size) not in ctx.sizes:
        return reproduce.serve(model, size, "calibrated", calib, x_test, y_test)
    model = copy.deepcopy(model)
    sct.context_of(model).unknown_scale = "interpolate" if how == "interpolate" else "nearest"
    return reproduce.accuracy(model, x_test, y_test, size)


def run_job(arm_name: str, seed: int, threads: int) -> dict:
    warnings.filterwarnings("ignore", message="sct_convert: input size")
    torch.set_num_threads(threads)
    x_train, y_train = reproduce.fashion_mnist.load("train", "cpu")
    x_train, y_train = x_train[:SETTINGS["limit"]], y_train[:SETTINGS["limit"]]
    x_test, y_test = reproduce.fashion_mnist.load("test", "cpu")
    x_test, y_test = x_test[:SETTINGS["test_limit"]], y_test[:SETTINGS["test_limit"]]
    model, train_s = reproduce.train(20, ARMS[arm_name], seed, SETTINGS, (x_train, y_train))
    t0 = time.time()
    calib = reproduce.calibration_batches(x_train, SETTINGS["calib_batches"], SETTINGS["batch_size"], seed)
    acc = {how: {str(s): served(model, s, how, calib, x_test, y_test) for s in SIZES} for how in SERVING}
    return {"arm": arm_name, "seed": seed, **{k: SETTINGS[k] for k in ("epochs", "limit", "test_limit")},
            "accuracy": acc, "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__}


def summary(results: list) -> dict:
    """arm -> serving -> size -> (mean, standard error over seeds, seeds)."""
    out = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        out[arm] = {}
        for how in SERVING:
            out[arm][how] = {}
            for s in SIZES:
                v = [r["accuracy"][how][str(s)] for r in runs]
                se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0
                out[arm][how][str(s)] = (round(statistics.mean(v), 2), round(se, 2), len(v))
    return out


def markdown(table: dict) -> str:
    head = "| arm | serving | " + " | ".join(map(str, SIZES)) + " |\n|---|---|" + "---|" * len(SIZES) + "\n"
    rows = []
    for arm, ways in table.items():
        for how, cells in ways.items():
            rows.append(f"| {arm} | {how} | " + " | ".join(
                f"{m:.1f} ± {se:.1f}" if n > 1 else f"{m:.1f}" for m, se, n in (cells[str(s)] for s in SIZES))
                + " |\n")
    seeds = sorted({n for ways in table.values() for c in ways["nearest"].values() for *_, n in [c]})
    return (f"Top-1 (%) on 1,000 Fashion-MNIST test images, mean ± standard error over seeds "
            f"(seed counts per arm: {seeds}; one seed: no error given)\n\n"
            + head + "".join(rows))


def report(results: list, out_dir: Path) -> None:
    table = summary(results)
    md = markdown(table)
    print(md)
    write_atomic(out_dir / "between_sizes.md", md)
    write_atomic(out_dir / "between_sizes.json", json.dumps({"settings": SETTINGS, "sizes": SIZES,
                                                             "table": table}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 4), sharey=True)
    for ax, (arm, ways) in zip(axes if len(table) > 1 else [axes], table.items()):
        for how, style in zip(SERVING, ("o-", "s-", "^--")):
            m = [ways[how][str(s)][0] for s in SIZES]
            se = [ways[how][str(s)][1] for s in SIZES]
            ax.errorbar(SIZES, m, yerr=se, fmt=style, ms=3, capsize=2, label=how)
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("test size (px)")
        ax.grid(alpha=0.3)
    (axes[0] if len(table) > 1 else axes).set_ylabel("top-1 (%)")
    (axes[0] if len(table) > 1 else axes).legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "between_sizes.png", dpi=100)
    print(f"wrote {out_dir / 'between_sizes.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs-file", default=str(HERE / "results" / "between_sizes_jobs.jsonl"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    jobs_file = Path(args.jobs_file)
    done = [json.loads(line) for line in jobs_file.read_text().splitlines() if line.strip()] \
        if jobs_file.exists() else []
    if not args.report_only:
        have = {(r["arm"], r["seed"]) for r in done}
        for seed in map(int, args.seeds.split(",")):
            for arm in args.arms.split(","):
                if (arm, seed) in have:
                    continue
                r = run_job(arm, seed, args.threads)
                with jobs_file.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                done.append(r)
                near, interp = r["accuracy"]["nearest"], r["accuracy"]["interpolate"]
                print(f"{arm:24s} seed {seed}: 32 {near['32']:.1f} 24 {near['24']:.1f}/{interp['24']:.1f} "
                      f"16 {near['16']:.1f} ({r['train_seconds']:.0f}s train, {r['eval_seconds']:.0f}s test)",
                      flush=True)
    report(done, jobs_file.parent)


if __name__ == "__main__":
    main()
