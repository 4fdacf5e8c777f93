"""Reproduce the paper's CIFAR ablation (Table 5) on Fashion-MNIST, through the public API only.

Arms (every one a user's loop: ``convert`` + ``SCTLoss``, drop-in style):

    plain@32, plain@16         the original net, one training size (the specialists)
    shared-bn@32/28, @32/16    SCT sampling + Eq. 1 loss, norm layers shared
                               (``convert(..., scale_specific_bn=False)``)
    s-bn@32/28, s-bn@32/16     SCT with Scale-Specific BN
    gn@32/16                   GroupNorm net (8 groups), SCT sampling, nothing to specialise
    s-bn@32/16+inplace         S-BN + ``SCTLoss(distill="inplace")``
    s-bn@32/16+ensemble        S-BN + ``SCTLoss(distill="ensemble")``

Every arm is tested at every size from 16 to 32 in steps of 2. For the S-BN arms, sizes that
are not a trained scale are also served two more ways besides the default nearest-branch
routing: a branch added with statistics interpolated between the two neighbouring branches
(``add_scale(init_from="interpolate")``), and a branch added and calibrated with unlabeled
training batches (``add_scale`` + ``calibrate``; 40 batches of 128 on the GPU preset).
Images are padded to 32x32; augmentation is a random flip and 4-pixel translation at 32,
before SCT's resize.

Jobs (model x arm x seed) run in worker processes; each finished job is appended to a JSONL
file, and a rerun skips the jobs already there, so a run can be split over several sessions.

    python benchmarks/reproduce.py --preset cpu        # ResNet-20, 2 seeds, < 1 h on 2 cores
    python benchmarks/reproduce.py --preset gpu --workers 14   # ResNet-20 and -56, 3 seeds
    python benchmarks/reproduce.py --report-only       # tables, JSON and PNG from the JSONL
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE.parent))
import fashion_mnist  # noqa: E402
from _host import write_atomic  # noqa: E402
from cifar_resnet import CifarResNet  # noqa: E402

import sct_convert as sct  # noqa: E402

SIZES = list(range(16, 33, 2))
ARMS = {
    "plain@32": dict(scales=[32]),
    "plain@16": dict(scales=[16]),
    "shared-bn@32/28": dict(scales=[32, 28], scale_specific_bn=False),
    "shared-bn@32/16": dict(scales=[32, 16], scale_specific_bn=False),
    "s-bn@32/28": dict(scales=[32, 28]),
    "s-bn@32/16": dict(scales=[32, 16]),
    "gn@32/16": dict(scales=[32, 16], norm="gn", scale_specific_bn=False),
    "s-bn@32/16+inplace": dict(scales=[32, 16], distill="inplace"),
    "s-bn@32/16+ensemble": dict(scales=[32, 16], distill="ensemble"),
}
# Ways to serve a size that is not a trained scale (S-BN arms); "nearest" is plain routing.
SERVING = ["nearest", "interpolated", "calibrated"]
RECOMMENDED_SERVING = "calibrated"  # what the README recommends for sizes between trained scales
PRESETS = {
    # CPU: small enough for < 1 h on 2 cores (every job also tests 9 sizes, S-BN arms 4 ways)
    "cpu": dict(models="resnet20", seeds="0,1", epochs=3, limit=5632, test_limit=1000, calib_batches=10,
                workers=1),
    "gpu": dict(models="resnet56,resnet20", seeds="0,1,2", epochs=15, limit=None, test_limit=None,
                calib_batches=40, workers=14),
}
# Paper, Table 5 (CIFAR-10, 160 epochs, mean of 3 runs), tested at 32.
PAPER_TABLE5 = {
    "ResNet-32": {"BN (shared)": {"{32}": 92.58, "{32,28}": 93.12, "{32,16}": 90.83},
                  "GN": {"{32}": 90.55, "{32,28}": 91.47, "{32,16}": 91.22},
                  "S-BN": {"{32,28}": 93.35, "{32,16}": 92.96}},
    "ResNet-110": {"BN (shared)": {"{32}": 93.59, "{32,28}": 93.83, "{32,16}": 86.25},
                   "S-BN": {"{32,28}": 94.28, "{32,16}": 94.46}},
}


def build_model(depth: int, arm: dict) -> nn.Module:
    norm = (lambda c: nn.GroupNorm(8, c)) if arm.get("norm") == "gn" else nn.BatchNorm2d
    return CifarResNet(depth, num_classes=10, in_chans=1, norm=norm)


def make_schedule(opt, kind: str, total_steps: int):
    if kind == "step":  # the paper's: /10 at 50% and 75% of training
        return torch.optim.lr_scheduler.MultiStepLR(opt, [total_steps // 2, total_steps * 3 // 4], 0.1)
    warmup = max(1, total_steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warmup if t < warmup else
        0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total_steps - warmup))))


def train(depth: int, arm: dict, seed: int, s: dict, data) -> tuple:
    """Train one arm the way a user's loop would; returns (model, seconds)."""
    x_train, y_train = data
    device = x_train.device
    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    model = build_model(depth, arm).to(device)
    criterion = nn.CrossEntropyLoss()
    scales = arm["scales"]
    if len(scales) > 1:  # the two changed lines of a user's loop
        model = sct.convert(model, scales, scale_specific_bn=arm.get("scale_specific_bn", True),
                            unknown_scale=arm.get("unknown_scale", "nearest"))
        sct.set_sampling(model, between=arm.get("between", False))
        criterion = sct.SCTLoss(criterion, distill=arm.get("distill"))
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9, weight_decay=5e-4)
    steps = len(x_train) // s["batch_size"]
    sched = make_schedule(opt, s["schedule"], s["epochs"] * steps)
    t0 = time.time()
    for _ in range(s["epochs"]):
        model.train()
        order = torch.randperm(len(x_train), device=device, generator=g)
        for i in range(steps):
            idx = order[i * s["batch_size"]:(i + 1) * s["batch_size"]]
            x = fashion_mnist.augment(x_train[idx], g)
            if len(scales) == 1 and scales[0] != 32:
                x = fashion_mnist.resize(x, scales[0])
            loss = criterion(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, time.time() - t0


@torch.no_grad()
def accuracy(model: nn.Module, x_test, y_test, size: int) -> float:
    model.eval()
    x = fashion_mnist.resize(x_test, size)
    correct = sum((model(x[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum()
                  for i in range(0, len(x), 1000))
    return round(100.0 * correct.item() / len(x), 2)


def calibration_batches(x_train, n: int, batch_size: int, seed: int):
    g = torch.Generator(device=x_train.device).manual_seed(10_000 + seed)
    order = torch.randperm(len(x_train), device=x_train.device, generator=g)[: n * batch_size]
    return [x_train[order[i * batch_size:(i + 1) * batch_size]] for i in range(n)]


def serve(model: nn.Module, size: int, how: str, calib, x_test, y_test) -> float:
    """Accuracy at ``size`` with a temporary branch for it, made the way ``how`` says."""
    model = copy.deepcopy(model)
    sct.add_scale(model, size)  # the default: interpolated between the neighbouring branches
    if how == "calibrated":
        sct.calibrate(model, calib, num_batches=len(calib), scales=[size], progress=False)
    return accuracy(model, x_test, y_test, size)


def run_job(job: dict) -> dict:
    """One (model, arm, seed): train, then test at every size (and every serving way)."""
    warnings.filterwarnings("ignore", message="sct_convert: input size")
    s = job["settings"]
    if s["device"] == "cpu":
        torch.set_num_threads(s["threads"])
    else:
        torch.set_num_threads(1)
        torch.backends.cudnn.benchmark = True
    x_train, y_train = fashion_mnist.load("train", s["device"])
    if s["limit"]:
        x_train, y_train = x_train[: s["limit"]], y_train[: s["limit"]]
    x_test, y_test = fashion_mnist.load("test", s["device"])
    if s["test_limit"]:
        x_test, y_test = x_test[: s["test_limit"]], y_test[: s["test_limit"]]
    arm = ARMS[job["arm"]]
    depth = int(job["model"].removeprefix("resnet"))
    model, train_s = train(depth, arm, job["seed"], s, (x_train, y_train))
    t0 = time.time()
    acc = {"nearest": {str(size): accuracy(model, x_test, y_test, size) for size in SIZES}}
    trained = set(arm["scales"])
    if len(trained) > 1 and arm.get("scale_specific_bn", True):
        calib = calibration_batches(x_train, s["calib_batches"], s["batch_size"], job["seed"])
        for how in SERVING[1:]:
            acc[how] = {str(size): (acc["nearest"][str(size)] if size in trained else
                                    serve(model, size, how, calib, x_test, y_test)) for size in SIZES}
    return {**{k: job[k] for k in ("model", "arm", "seed")}, "epochs": s["epochs"], "limit": s["limit"],
            "test_limit": s["test_limit"], "calib_batches": s["calib_batches"], "added_branch_init": "interpolate",
            "schedule": s["schedule"], "accuracy": acc, "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.time() - t0, 1), "device": s["device"],
            "device_name": torch.cuda.get_device_name() if s["device"].startswith("cuda") else "cpu",
            "torch": torch.__version__}


def job_key(r: dict) -> tuple:
    return (r["model"], r["arm"], r["seed"], r["epochs"], r["limit"], r.get("test_limit"), r["schedule"])


def read_jobs(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_all(jobs: list, workers: int, jobs_file: Path, deadline: float) -> None:
    start = time.time()

    def record(result: dict) -> None:
        with jobs_file.open("a") as f:
            f.write(json.dumps(result) + "\n")
        near = result["accuracy"]["nearest"]
        print(f"{result['model']:8s} {result['arm']:22s} seed {result['seed']}: 32:{near['32']:.2f} "
              f"24:{near['24']:.2f} 16:{near['16']:.2f} ({result['train_seconds']:.0f}s train, "
              f"{time.time() - start:.0f}s elapsed)", flush=True)

    if workers <= 1:
        for job in jobs:
            if time.time() - start > deadline:
                print("deadline reached; rerun to continue", flush=True)
                return
            record(run_job(job))
        return
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        pending = set()
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < workers and time.time() - start < deadline:
                pending.add(pool.submit(run_job, queue.pop(0)))
            if not pending:
                print("deadline reached; rerun to continue", flush=True)
                break
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                record(fut.result())


def summarise(results: list, model: str) -> dict:
    """Per arm: per-seed and mean/std accuracy at every size, for every serving way."""
    out = {}
    for arm in ARMS:
        runs = sorted((r for r in results if r["model"] == model and r["arm"] == arm), key=lambda r: r["seed"])
        if not runs:
            continue
        entry = {"scales": ARMS[arm]["scales"], "seeds": [r["seed"] for r in runs],
                 "train_seconds": [r["train_seconds"] for r in runs], "serving": {}}
        for how in runs[0]["accuracy"]:
            per_seed = [r["accuracy"][how] for r in runs]
            entry["serving"][how] = {
                "per_seed": per_seed,
                "mean": {k: round(statistics.mean(p[k] for p in per_seed), 2) for k in per_seed[0]},
                "std": {k: round(statistics.stdev(p[k] for p in per_seed), 2) if len(per_seed) > 1 else 0.0
                        for k in per_seed[0]},
            }
        out[arm] = entry
    return out


def best_per_size(arms: dict) -> dict:
    """The best mean accuracy of any arm (default serving) at each size."""
    return {str(size): max(a["serving"]["nearest"]["mean"][str(size)] for a in arms.values()) for size in SIZES}


def serving_verdict(arms: dict) -> dict:
    """For each S-BN arm and serving way: the gap to the best arm (default serving) per size."""
    best = best_per_size(arms)
    verdict = {"best_arm_at_size": best}
    for arm, a in arms.items():
        if len(a["serving"]) == 1:
            continue
        verdict[arm] = {how: {k: round(v["mean"][k] - best[k], 2) for k in best}
                        for how, v in a["serving"].items()}
    return verdict


def goals(arms: dict, serving: str) -> dict:
    """The issue's figures for S-BN at {32, 16} (mean over seeds), each with its margin and, for
    the pairwise ones, the standard error of the per-seed difference (arms with the same seed
    start from the same weights and see the same batches, so differences pair by seed)."""
    def at(arm, size, how="nearest"):
        return arms[arm]["serving"][how]["mean"][str(size)]

    def paired_se(a, b, size):
        if arms[a]["seeds"] != arms[b]["seeds"] or len(arms[a]["seeds"]) < 2:
            return None
        runs_a, runs_b = arms[a]["serving"]["nearest"]["per_seed"], arms[b]["serving"]["nearest"]["per_seed"]
        diffs = [ra[str(size)] - rb[str(size)] for ra, rb in zip(runs_a, runs_b)]
        return statistics.stdev(diffs) / math.sqrt(len(diffs))

    need = ("s-bn@32/16", "plain@32", "plain@16", "shared-bn@32/16")
    if not all(a in arms for a in need):
        return {}
    sbn = "s-bn@32/16"
    pairs = {
        "s-bn@32/16 at 32 >= plain@32 at 32": ("plain@32", 32, 0),
        "s-bn@32/16 at 16 >= plain@16 at 16": ("plain@16", 16, 0),
        "s-bn@32/16 > shared-bn@32/16 at 32": ("shared-bn@32/16", 32, 0),
        "s-bn@32/16 > shared-bn@32/16 at 16": ("shared-bn@32/16", 16, 0),
        "s-bn@32/16 at 16 >= plain@32 at 16 + 40": ("plain@32", 16, 40),
    }
    out = {k: (at(sbn, size) - at(other, size) - offset, paired_se(sbn, other, size))
           for k, (other, size, offset) in pairs.items()}
    if serving in arms[sbn]["serving"]:
        best = best_per_size(arms)
        out[f"s-bn@32/16 served '{serving}' >= best arm - 0.3 at every size (worst size)"] = (min(
            at(sbn, size, serving) - best[str(size)] + 0.3 for size in SIZES), None)
    return {k: {"margin": round(v, 2), "paired_se": None if se is None else round(se, 2),
                "met": v >= 0 if ">=" in k else v > 0} for k, (v, se) in out.items()}


def markdown(model: str, arms: dict, verdict: dict, met: dict) -> str:
    """README-ready tables: size x arm, serving ways, goals."""
    def head(first: str) -> str:
        return f"| {first} | " + " | ".join(str(s) for s in SIZES) + " |\n|---|" + "---|" * len(SIZES) + "\n"

    lines = [f"**{model}**, top-1 (%), mean ± std over seeds, default serving (nearest branch)\n\n",
             head("arm \\ test size")]
    for arm, a in arms.items():
        m, sd = a["serving"]["nearest"]["mean"], a["serving"]["nearest"]["std"]
        lines.append(f"| {arm} | " + " | ".join(f"{m[str(s)]:.2f} ± {sd[str(s)]:.2f}" for s in SIZES) + " |\n")
    for arm, ways in verdict.items():
        if arm == "best_arm_at_size":
            continue
        lines += [f"\n{arm}, each serving way minus the best arm at that size (points)\n\n", head("serving")]
        lines += [f"| {how} | " + " | ".join(f"{g[str(s)]:+.2f}" for s in SIZES) + " |\n" for how, g in ways.items()]
    if met:
        lines.append("\n| goal | margin | paired SE | met |\n|---|---|---|---|\n")
        lines += [f"| {k} | {v['margin']:+.2f} | "
                  f"{'' if v.get('paired_se') is None else format(v['paired_se'], '.2f')} | "
                  f"{'yes' if v['met'] else 'no'} |\n" for k, v in met.items()]
    return "".join(lines)


def report(results: list, out_dir: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for model in sorted({r["model"] for r in results}):
        arms = summarise(results, model)
        rows = [r for r in results if r["model"] == model]
        verdict = serving_verdict(arms)
        print(f"\n{model} on {dataset}: mean top-1 (%) over seeds, default serving (nearest branch)")
        print(f"{'arm':24s}{'seeds':>6s} " + "".join(f"{s:>7d}" for s in SIZES))
        for arm, a in arms.items():
            m, sd = a["serving"]["nearest"]["mean"], a["serving"]["nearest"]["std"]
            print(f"{arm:24s}{len(a['seeds']):6d} " + "".join(f"{m[str(s)]:7.2f}" for s in SIZES)
                  + f"   (std at 32/16: {sd['32']:.2f}/{sd['16']:.2f})")
        for arm, ways in verdict.items():
            if arm == "best_arm_at_size":
                continue
            print(f"\n{arm}: serving way, minus the best arm at each size")
            for how, gaps in ways.items():
                print(f"  {how:24s}" + "".join(f"{gaps[str(s)]:+7.2f}" for s in SIZES))
        met = goals(arms, RECOMMENDED_SERVING)
        print()
        for k, v in met.items():
            print(f"{'met ' if v['met'] else 'MISS'} {k}: {v['margin']:+.2f}")
        first = rows[0]
        summary = {
            "dataset": dataset, "model": model,
            "settings": {"epochs": first["epochs"], "train_images": first["limit"] or 60000,
                         "test_images": first["test_limit"] or 10000,
                         "schedule": first["schedule"], "batch_size": 128,
                         "optimizer": "SGD momentum 0.9, weight decay 5e-4, lr 0.1",
                         "augment": "random flip + 4px translation at 32, then SCT's resize",
                         "test": "test images resized (bilinear, antialias) to each size",
                         "calibration": f"{first['calib_batches']} unlabeled batches of 128 training images"},
            "devices": sorted({f"{r['device']} ({r['device_name']}, torch {r['torch']})" for r in rows}),
            "train_seconds_total": round(sum(r["train_seconds"] for r in rows), 1),
            "train_and_test_seconds_total": round(sum(r["train_seconds"] + r["eval_seconds"] for r in rows), 1),
            "sizes": SIZES, "arms": arms, "serving_vs_best_arm": verdict,
            "recommended_serving": RECOMMENDED_SERVING,
            # runs before add_scale interpolated by default started added branches as a copy
            "added_branch_init": sorted({r.get("added_branch_init", "copy of the nearest branch") for r in rows}), "goals": met, "paper_table5": PAPER_TABLE5,
        }
        stem = f"reproduce_{dataset}_{model}"
        write_atomic(out_dir / f"{stem}.json", json.dumps(summary, indent=1))
        write_atomic(out_dir / f"{stem}.md", markdown(model, arms, verdict, met))
        fig, ax = plt.subplots(figsize=(8, 5))
        for arm, a in arms.items():
            m = a["serving"]["nearest"]["mean"]
            ax.plot(SIZES, [m[str(s)] for s in SIZES], marker="o", ms=3, label=arm)
        best_sbn = arms.get("s-bn@32/16")
        if best_sbn and "calibrated" in best_sbn["serving"]:
            m = best_sbn["serving"]["calibrated"]["mean"]
            ax.plot(SIZES, [m[str(s)] for s in SIZES], "k--", label="s-bn@32/16, in-between sizes calibrated")
        ax.set_xlabel("test size (pixels)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{model}, {dataset}: mean of {len(next(iter(arms.values()))['seeds'])} seeds, "
                     f"{first['epochs']} epochs x {first['limit'] or 60000} images, "
                     f"{first['test_limit'] or 10000} test images", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--models", default=None, help="comma list of resnet<6n+2> (preset's default)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of arm names")
    p.add_argument("--seeds", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images")
    p.add_argument("--test-limit", type=int, default=None, help="test on the first N images")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; start no job after this")
    p.add_argument("--jobs-file", default="benchmarks/results/reproduce_jobs.jsonl")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    jobs_file = Path(args.jobs_file)
    jobs_file.parent.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        unknown = [a for a in args.arms.split(",") if a not in ARMS]
        if unknown:
            raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
        settings = {"device": device, "epochs": args.epochs, "limit": args.limit, "test_limit": args.test_limit,
                    "lr": args.lr,
                    "batch_size": args.batch_size, "schedule": args.schedule,
                    "calib_batches": args.calib_batches, "threads": args.threads}
        done = {job_key(r) for r in read_jobs(jobs_file)}
        jobs = [{"model": m, "arm": a, "seed": int(seed), "settings": settings}
                for m in args.models.split(",") for seed in args.seeds.split(",") for a in args.arms.split(",")]
        todo = [j for j in jobs if (j["model"], j["arm"], j["seed"], args.epochs, args.limit, args.test_limit,
                                    args.schedule) not in done]
        print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already in {jobs_file}; running {len(todo)} "
              f"on {device} with {args.workers} worker(s)", flush=True)
        run_all(todo, args.workers, jobs_file, args.deadline)
    results = read_jobs(jobs_file)
    if args.models:
        results = [r for r in results if r["model"] in args.models.split(",")]
    if args.epochs:
        results = [r for r in results if (r["epochs"], r["limit"], r.get("test_limit")) ==
                   (args.epochs, args.limit, args.test_limit)]
    if results:
        report(results, Path(args.out_dir), "fashion-mnist")


if __name__ == "__main__":
    main()
