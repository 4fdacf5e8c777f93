"""Cost of an SCT training step against the single-scale steps it replaces.

Time: SCT step / (sum of the original model's single-scale step times at the same scales),
for the drop-in loop (``criterion(model(x), y)``) and for ``sct.train_step``; each repeat runs
every variant back to back in a rotating order, and the table reports medians.

Memory: GPU: ``torch.cuda.max_memory_allocated`` per step. CPU: bytes of the tensors autograd
saves for backward (a ``saved_tensors_hooks`` count), i.e. the activation memory that
differs between the variants; weights, gradients and optimizer state are the same for all.

    python benchmarks/train_cost.py                               # CPU, batch 16
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/train_cost.py

On CPU, glibc malloc's defaults hand the drop-in loop's freed activations (2.1x those of one
scale) back to the kernel, and the next step page-faults them in again; the table prints
system time and minor page faults per step so that cost shows. The allocator and its
settings are printed with the results.

    python benchmarks/train_cost.py --device cuda --batch 64       # GPU
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import timm
import torch

import sct_convert as sct
from _host import allocator  # benchmarks/ is on sys.path when a script here runs


SCALES = [224, 192, 128]


class SavedBytes:
    """Peak bytes saved for backward while the context is open (sum; freed after backward)."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def pack(self, t):
        self.current += t.numel() * t.element_size()
        self.peak = max(self.peak, self.current)
        return t

    def unpack(self, t):
        return t

    def released(self):
        self.current = 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    dev = args.device
    cuda = dev.startswith("cuda")
    torch.manual_seed(0)
    original = timm.create_model(args.model, num_classes=100).to(dev).train()
    converted = sct.convert(copy.deepcopy(original), SCALES).train()
    crit = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    ce = torch.nn.CrossEntropyLoss()
    opt_o = torch.optim.SGD(original.parameters(), lr=1e-4, momentum=0.9)
    opt_c = torch.optim.SGD(converted.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch, 3, SCALES[0], SCALES[0], device=dev)
    y = torch.randint(0, 100, (args.batch,), device=dev)
    xs = {s: sct.resize_to(x, (s, s)) for s in SCALES}

    def single(s):
        opt_o.zero_grad(set_to_none=True)
        ce(original(xs[s]), y).backward()
        opt_o.step()

    def drop_in():
        opt_c.zero_grad(set_to_none=True)
        crit(converted(x), y).backward()
        opt_c.step()

    def lean():
        sct.train_step(converted, x, y, crit, opt_c)

    variants = {f"single@{s}": (lambda s=s: single(s)) for s in SCALES}
    variants.update({"drop-in": drop_in, "train_step": lean})

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        return wall, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt

    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(variants[k]))
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    # Kernel time and page faults per step: on CPU, where the time a variant loses goes.
    sys_s = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    faults = {k: statistics.median(t[2] for t in v) for k, v in times.items()}
    total_single = sum(med[f"single@{s}"] for s in SCALES)
    print(f"{args.model} scales={SCALES} batch={args.batch} device={dev} repeats={args.repeats} "
          f"torch={torch.__version__} allocator={allocator()}")
    print(f"{'variant':14s} {'step s':>8s} {'/ sum single':>12s} {'sys s':>7s} {'page faults':>11s}")
    for k in names:
        ratio = f"{med[k] / total_single:.3f}" if k in ("drop-in", "train_step") else ""
        print(f"{k:14s} {med[k]:8.3f} {ratio:>12s} {sys_s[k]:7.2f} {faults[k]:11.0f}")
    print(f"{'sum single':14s} {total_single:8.3f} {'':12s} "
          f"{sum(sys_s[f'single@{s}'] for s in SCALES):7.2f} "
          f"{sum(faults[f'single@{s}'] for s in SCALES):11.0f}")

    # memory
    peaks = {}
    for k in ("single@224", "drop-in", "train_step"):
        fn = variants[k]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks[k] = torch.cuda.max_memory_allocated()
        else:
            counter = SavedBytes()
            if k == "train_step":  # scales run one after another: peak of one scale's graph
                per = []
                for s in SCALES:
                    counter = SavedBytes()
                    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                        with sct.scale(converted, s):
                            out = converted(xs[s])
                    per.append(counter.peak)
                    del out
                peaks[k] = max(per)
            else:
                with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                    out = (original(xs[224]) if k.startswith("single") else converted(x))
                peaks[k] = counter.peak
                del out
    what = "max_memory_allocated" if cuda else "bytes saved for backward"
    base = peaks["single@224"]
    print(f"peak memory ({what}): single@224 {base / 2**20:.0f} MiB; "
          f"train_step {peaks['train_step'] / 2**20:.0f} MiB ({peaks['train_step'] / base:.3f}x); "
          f"drop-in {peaks['drop-in'] / 2**20:.0f} MiB ({peaks['drop-in'] / base:.3f}x)")


if __name__ == "__main__":
    main()
