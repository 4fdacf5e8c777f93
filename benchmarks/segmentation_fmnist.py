"""Does S-BN's advantage at distant scales (the paper's Table 5) carry over to segmentation?

Fashion-MNIST as a dense task (``examples/segmentation_sct.py``: 64x64 canvases of 2-4 garments
at random positions and sizes, garment pixels labelled with their class, background 0), a
user's own encoder-decoder (``SegNet``) and torchvision's reference loss (``out`` + 0.5 ``aux``).
Arms, every one a user's loop (``convert`` + ``SCTLoss``, drop-in style):

    plain@64              the original net, trained at 64 only
    shared-bn@64/32       SCT sampling + Eq. 1 loss at {64, 32}, BN shared
                          (``convert(..., scale_specific_bn=False)``)
    s-bn@64/32            SCT with Scale-Specific BN; label maps resized to each output
                          (``SCTLoss`` default, ``match="target"``)
    s-bn@64/32 (match=output)   the same, outputs upsampled to the 64x64 labels instead

Each model is scored (mIoU over the classes present, predictions upsampled to the 64x64 labels)
at every size from 32 to 64 in steps of 8; S-BN serves in-between sizes with the nearest branch.
Jobs (arm x seed) are appended to a JSONL file as they finish and skipped on a rerun.

    python benchmarks/segmentation_fmnist.py                  # CPU preset: 4 arms x 2 seeds, ~20 min on 2 cores
    python benchmarks/segmentation_fmnist.py --seeds 0,1,2    # one more seed (the two done are skipped)
    python benchmarks/segmentation_fmnist.py --report-only    # table (mean ± SE) and plot from the JSONL
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import segmentation_sct as seg  # noqa: E402
import _seeds as seeds  # noqa: E402
from _host import write_atomic  # noqa: E402

import sct_convert as sct  # noqa: E402

SIZES = [32, 40, 48, 56, 64]
ARMS = {
    "plain@64": dict(scales=[64]),
    "shared-bn@64/32": dict(scales=[64, 32], scale_specific_bn=False),
    "s-bn@64/32": dict(scales=[64, 32]),
    "s-bn@64/32 (match=output)": dict(scales=[64, 32], match="output"),
}
SETTINGS = dict(canvases=4000, test_canvases=1000, epochs=8, lr=0.1, batch_size=32)


def run_job(arm: str, seed: int, data) -> dict:
    x, y, x_test, y_test = data
    spec = ARMS[arm]
    torch.manual_seed(seed)
    model = seg.SegNet()
    loss_fn = seg.criterion
    if len(spec["scales"]) > 1:  # the two changed lines of a user's loop
        model = sct.convert(model, spec["scales"], scale_specific_bn=spec.get("scale_specific_bn", True))
        loss_fn = sct.SCTLoss(seg.criterion, match=spec.get("match", "target"))
    seconds = seg.train(model, loss_fn, x, y, SETTINGS["epochs"], SETTINGS["batch_size"], SETTINGS["lr"],
                        seed=seed, log=lambda line: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the nearest-branch notice at in-between sizes
        miou = {str(s): seg.mean_iou(model, x_test, y_test, s) for s in SIZES}
    return {"arm": arm, "seed": seed, "miou": miou, "train_seconds": round(seconds, 1),
            "settings": SETTINGS, "torch": torch.__version__}


def summarise(results: list) -> dict:
    table = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if runs:
            table[arm] = {"seeds": len(runs), "miou": seeds.by_size(runs, "miou", SIZES),
                          "train_seconds": statistics.mean(r["train_seconds"] for r in runs)}
    return table


def report(results: list, out_dir: Path) -> None:
    # (training seconds are in the JSON; they are not comparable when jobs share the CPU)
    table = summarise(results)
    text = seeds.markdown(table, "miou", SIZES)
    write_atomic(out_dir / "segmentation_fmnist.md", text)
    write_atomic(out_dir / "segmentation_fmnist.json", seeds.json_table(table, "miou"))
    seeds.plot(table, "miou", SIZES, out_dir / "segmentation_fmnist.png", "test size (px)", "mIoU (%)",
               "Fashion-MNIST canvases, SegNet, trained at {64} or {64, 32}")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs_file = out_dir / "segmentation_fmnist_jobs.jsonl"
    if not args.report_only:
        seeds.run_missing(jobs_file, args.arms, args.seeds, lambda: (
            *seg.make_canvases(SETTINGS["canvases"], "train", seed=0),
            *seg.make_canvases(SETTINGS["test_canvases"], "test", seed=1)), run_job, "miou")
    report(seeds.read_jobs(jobs_file), out_dir)


if __name__ == "__main__":
    main()
