"""SCT for a torchvision detector on real data: mAP@0.5 at each transform size, and the step's cost.

Fashion-MNIST as a detection task (``examples/detection_sct.py``: 128x128 canvases of 1-3
garments at random positions and sizes, a tight box and class per garment) and torchvision's
``ssdlite320_mobilenet_v3_large`` (random init, 11 classes), trained with torchvision's reference
loop (``loss_dict = model(images, targets); sum(loss_dict.values())``). The scale is the size the
model's transform resizes every image to (``fixed_size``). Arms:

    plain@128           the original model, its transform at 128, trained at 128 only
    shared-bn@128/64    SCT sampling + Eq. 1 mean at {128, 64}, BN shared
                        (``convert(..., scale_specific_bn=False)``)
    s-bn@128/64         SCT with Scale-Specific BN (``convert(model, [128, 64])``)

Each model is scored by COCO mAP at IoU 0.5 (torchmetrics' ``MeanAveragePrecision``, pycocotools)
on 500 test canvases with its transform set to every size from 64 to 128 in steps of 16; the S-BN
model serves in-between sizes with the nearest branch (``unknown_scale="nearest"``, the default)
and, as a second row, with the blend of ``unknown_scale="interpolate"``. Jobs (arm x seed) are
appended to a JSONL file as they finish and skipped on a rerun.

``--step-cost`` measures, in one process on an otherwise idle CPU, the median time of a training
step of the SCT model against the sum of the plain model's steps at each scale alone.

    python benchmarks/detection_fmnist.py --seeds 0,1 --threads 1   # CPU preset (jobs in one process)
    python benchmarks/detection_fmnist.py --step-cost                # the SCT step's cost
    python benchmarks/detection_fmnist.py --report-only              # table, plot from the JSONL
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import detection_sct as det  # noqa: E402
import _seeds as seeds  # noqa: E402
from _host import write_atomic  # noqa: E402

import sct_convert as sct  # noqa: E402

SCALES = [128, 64]
SIZES = [64, 80, 96, 112, 128]
ARMS = {
    "plain@128": dict(scales=[128]),
    "shared-bn@128/64": dict(scales=SCALES, scale_specific_bn=False),
    "s-bn@128/64": dict(scales=SCALES),
}
SETTINGS = dict(canvases=1500, test_canvases=500, epochs=8, lr=0.05, batch_size=16)


def build(arm: str) -> torch.nn.Module:
    spec = ARMS[arm]
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=11)
    if len(spec["scales"]) == 1:
        model.transform.fixed_size = (spec["scales"][0],) * 2  # the plain model at its one size
        return model
    return sct.convert(model, spec["scales"], scale_specific_bn=spec.get("scale_specific_bn", True))


def score(model, x_test, y_test) -> dict:
    """mAP@0.5 with the model's transform at each size in SIZES."""
    out = {}
    for s in SIZES:
        model.transform.fixed_size = (s, s)  # an S-BN model routes by this size
        out[str(s)] = round(det.mean_ap_50(model, x_test, y_test), 2)
    return out


def run_job(arm: str, seed: int, data) -> dict:
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    model = build(arm)
    seconds = det.train(model, x, y, SETTINGS["epochs"], SETTINGS["batch_size"], SETTINGS["lr"],
                        log=lambda line: print(f"  {arm} seed {seed} {line}", flush=True))
    result = {"arm": arm, "seed": seed, "train_seconds": round(seconds, 1), "settings": SETTINGS,
              "torch": torch.__version__, "torchvision": torchvision.__version__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nearest-branch notices, many-detections notices
        result["map50"] = score(model, x_test, y_test)
        if arm.startswith("s-bn"):
            sct.context_of(model).unknown_scale = "interpolate"
            result["map50_interpolate"] = score(model, x_test, y_test)
    return result


def step_cost(repeats: int = 12) -> str:
    """Median seconds of one training step: SCT {128, 64} against plain at 128 plus plain at 64."""
    x, y = det.make_canvases(16 * 4, "train", seed=0)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    arms = {f"plain@{s}": None for s in SCALES}
    arms["sct s-bn@128/64"] = None
    models = {}
    for name in arms:
        torch.manual_seed(0)
        if name.startswith("plain"):
            m = build("plain@128")
            m.transform.fixed_size = (int(name.split("@")[1]),) * 2
        else:
            m = build("s-bn@128/64")
        models[name] = (m.train(), torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    times = {name: [] for name in models}
    for r in range(repeats + 2):  # interleaved, so drift hits every arm alike; 2 warm-up rounds
        for name, (m, opt) in models.items():
            images, targets = batches[r % len(batches)]
            t = time.perf_counter()
            loss = sum(m(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    single = sum(med[f"plain@{s}"] for s in SCALES)
    lines = [f"ssdlite320_mobilenet_v3_large, batch 16, {torch.get_num_threads()} threads, "
             f"median of {repeats} interleaved steps, torch {torch.__version__}", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {v:.3f} |" for name, v in med.items()]
    lines += [f"| plain@128 + plain@64 | {single:.3f} |", "",
              f"SCT step / sum of single-scale steps: {med['sct s-bn@128/64'] / single:.2f}"]
    return "\n".join(lines) + "\n"


def summarise(results: list) -> dict:
    table = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        for key, label in (("map50", arm), ("map50_interpolate", f"{arm} (interpolate)")):
            if runs and key in runs[0]:
                table[label] = {"seeds": len(runs), "map50": seeds.by_size(runs, key, SIZES)}
    return table


def report(results: list, out_dir: Path) -> None:
    table = summarise(results)
    text = seeds.markdown(table, "map50", SIZES)
    write_atomic(out_dir / "detection_fmnist.md", text)
    write_atomic(out_dir / "detection_fmnist.json", seeds.json_table(table, "map50"))
    seeds.plot(table, "map50", SIZES, out_dir / "detection_fmnist.png", "transform size (px)", "mAP@0.5 (%)",
               "Fashion-MNIST canvases, SSDlite, trained at {128} or {128, 64}")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--step-cost", action="store_true", help="measure the SCT step's cost and exit")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.step_cost:
        text = step_cost()
        write_atomic(out_dir / "detection_step_cost_cpu.txt", text)
        print(text)
        return
    jobs_file = out_dir / "detection_fmnist_jobs.jsonl"
    if not args.report_only:
        seeds.run_missing(jobs_file, args.arms, args.seeds, lambda: (
            *det.make_canvases(SETTINGS["canvases"], "train", seed=0),
            *det.make_canvases(SETTINGS["test_canvases"], "test", seed=1)), run_job, "map50")
    report(seeds.read_jobs(jobs_file), out_dir)


if __name__ == "__main__":
    main()
