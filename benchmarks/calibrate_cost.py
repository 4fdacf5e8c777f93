"""Cost of sct.calibrate against the same number of plain forward passes.

resnet50, 20 batches of 32 random images at {224, 160, 128}: calibrate runs 60 forwards (20 per
scale, each branch collecting statistics). Two references on the same, already resized
batches, no grad: the original model's 60 eval forwards, and the usual way to re-estimate BN
statistics without this library (train-mode BN with ``momentum=None``, what
``torch.optim.swa_utils.update_bn`` does), which pays for batch statistics as calibrate must.
Repeats rotate the order; medians.

    python benchmarks/calibrate_cost.py                  # CPU
    python benchmarks/calibrate_cost.py --device cuda
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import sct_convert as sct
from _host import allocator  # benchmarks/ is on sys.path when a script here runs


SCALES = [224, 160, 128]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    original = timm.create_model("resnet50").to(args.device).eval()
    model = sct.convert(copy.deepcopy(original), SCALES)
    data = [torch.randn(args.batch_size, 3, 224, 224, device=args.device) for _ in range(args.batches)]
    resized = {s: [sct.resize_to(x, (s, s)) for x in data] for s in SCALES}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        with torch.no_grad():
            for s in SCALES:
                for x in resized[s]:
                    original(x)

    reestimate_model = copy.deepcopy(original)
    bns = [m for m in reestimate_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def reestimate():  # torch.optim.swa_utils.update_bn, once per scale
        for bn in bns:
            bn.momentum = None
        reestimate_model.train()
        with torch.no_grad():
            for s in SCALES:
                for bn in bns:
                    bn.reset_running_stats()
                for x in resized[s]:
                    reestimate_model(x)
        reestimate_model.eval()

    def calib():
        sct.calibrate(model, data, num_batches=args.batches, progress=False)

    variants = {"plain forwards": plain, "BN re-estimation": reestimate, "calibrate": calib}
    names = list(variants)
    times = {k: [] for k in names}
    for r in range(args.repeats):
        for name in names[r % 3:] + names[:r % 3]:
            fn = variants[name]
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"resnet50, {args.batches} batches of {args.batch_size} at {SCALES}, device {args.device}, "
          f"repeats {args.repeats}, torch {torch.__version__}, allocator {allocator()}")
    for k, v in med.items():
        print(f"{k:15s} {v:8.2f} s")
    print(f"calibrate / plain forwards: {med['calibrate'] / med['plain forwards']:.3f}")
    print(f"calibrate / BN re-estimation: {med['calibrate'] / med['BN re-estimation']:.3f}")
    print(f"BN re-estimation / plain forwards: {med['BN re-estimation'] / med['plain forwards']:.3f}")


if __name__ == "__main__":
    main()
