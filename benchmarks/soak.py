"""Sustained load on every serving path: throughput, tail latency, memory over time, and every
answer checked.

Four paths serve one converted timm model, each from ``--threads`` threads sending single-image
requests of random sizes:

- ``eager``: the converted model itself (trained scales, sizes in between, non-square sizes);
- ``onnx``: its switchable ONNX file, one onnxruntime session shared by every thread (same sizes);
- ``per-scale``: one ONNX file per scale, one shared session each (each request at a trained size);
- ``cascade``: a cascade fitted on the model's own answers, served by
  ``sct_convert.runtime.CascadeSession`` (any size).

Each path runs until ``--requests`` requests or ``--seconds`` have passed, whichever is first. The
inputs come from a pool drawn once; every answer is compared with the same input served alone,
single-threaded, before the load (eager and the ONNX sessions: bit-exact). Reported per path:
requests/s, p50 and p99 latency, and the process's resident memory after a warm-up (the first
tenth of the requests, at most 20 per pool input) and at the end.

    python benchmarks/soak.py                        # 20,000 requests or 5 minutes per path
    python benchmarks/soak.py --quick                # seconds: what tests/test_soak.py runs

Exits 1 if any answer differs or, outside ``--quick``, memory grows by 2% or more.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

import sct_convert as sct

RESULTS = Path(__file__).resolve().parent / "results"


def resident_mb() -> float:
    """This process's resident memory (Linux ``/proc/self/statm``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def request_pool(scales: Sequence[int], count: int, seed: int, trained_only: bool) -> List[np.ndarray]:
    """``count`` single-image inputs: trained scales, sizes in between and non-square sizes."""
    rng = random.Random(seed)
    lo, hi = min(scales), max(scales)
    pool = []
    for i in range(count):
        kind = "trained" if trained_only else ("trained", "between", "non-square")[i % 3]
        if kind == "trained":
            h = w = rng.choice(list(scales))
        elif kind == "between":
            h = w = rng.randint(lo + 1, hi - 1)
        else:
            h, w = rng.randint(lo, hi), rng.randint(lo, hi)
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        pool.append(torch.randn(1, 3, h, w, generator=g).numpy())
    return pool


def soak(serve: Callable[[np.ndarray], np.ndarray], pool: List[np.ndarray], threads: int, requests: int,
         seconds: float, warmup: int) -> Dict[str, float]:
    """Serve random pool items from ``threads`` threads; every answer against ``serve`` alone."""
    reference = [serve(x) for x in pool]  # alone, before the load
    memory_start = [resident_mb()]  # replaced once the first `warmup` requests under load are issued
    lock = threading.Lock()
    latencies: List[float] = []
    wrong: List[str] = []
    issued = [0]
    deadline = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: List[float] = []
        while time.perf_counter() < deadline:
            with lock:
                if issued[0] >= requests:
                    break
                issued[0] += 1
                if issued[0] == warmup:  # the allocators have seen every size from every thread
                    memory_start[0] = resident_mb()
            i = rng.randrange(len(pool))
            start = time.perf_counter()
            out = serve(pool[i])
            mine.append(time.perf_counter() - start)
            if not np.array_equal(out, reference[i]):
                with lock:
                    wrong.append(f"input {i} {pool[i].shape}: max diff {np.abs(out - reference[i]).max():.3g}")
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    memory_end = resident_mb()
    memory_start = memory_start[0]
    latencies.sort()
    return {
        "requests": len(latencies), "seconds": round(elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
        "memory_start_mb": round(memory_start, 1), "memory_end_mb": round(memory_end, 1),
        "memory_growth_pct": round(100 * (memory_end - memory_start) / memory_start, 2),
        "wrong": len(wrong), "first_wrong": wrong[:3],
    }


def build(arch: str, scales: Sequence[int], workdir: Path, seed: int) -> Dict[str, Tuple[Callable, bool]]:
    """The four paths' serve functions over one converted model, and whether each takes only trained sizes."""
    import timm

    from sct_convert.runtime import CascadeSession, open_session

    torch.manual_seed(seed)
    model = sct.convert(timm.create_model(arch, num_classes=10), scales=list(scales)).eval()
    with torch.no_grad():  # branches that differ, so a wrong branch is a wrong answer
        for _, layer in sct.scale_specific_layers(model):
            for i, branch in enumerate(layer.branches.values()):
                branch.running_mean.add_(0.05 * i)
    switchable = sct.export_onnx(model, workdir / "model.onnx")
    session = open_session(switchable, threads=1)
    per_scale = {s: open_session(sct.export_onnx(model, workdir / f"model_{s}.onnx", scale=s), threads=1)
                 for s in scales}
    calibration = [(x, model(x).argmax(1)) for x in
                   (torch.randn(16, 3, max(scales), max(scales), generator=torch.Generator().manual_seed(s))
                    for s in range(4))]
    with torch.no_grad():
        cascade = sct.fit_cascade(model, calibration, max_drop=1.0)
    cascade_session = CascadeSession(str(sct.export_onnx(cascade, workdir / "cascade.onnx")),
                                     options=_one_thread_options())
    name = session.get_inputs()[0].name

    @torch.no_grad()
    def eager(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()

    return {
        "eager": (eager, False),
        "onnx": (lambda x: session.run(None, {name: x})[0], False),
        "per-scale": (lambda x: per_scale[x.shape[-1]].run(None, {name: x})[0], True),
        "cascade": (cascade_session, False),
    }


def _one_thread_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="timm model (random init)")
    parser.add_argument("--scales", default="64,48,32", help="the three trained scales")
    parser.add_argument("--threads", type=int, default=8, help="client threads per path")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per path, at most")
    parser.add_argument("--seconds", type=float, default=300, help="time per path, at most")
    parser.add_argument("--pool", type=int, default=96, help="distinct inputs the requests draw from")
    parser.add_argument("--paths", default="eager,onnx,per-scale,cascade")
    parser.add_argument("--quick", action="store_true", help="test_resnet, 300 requests or 5 s per path")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.requests, args.seconds, args.pool = "test_resnet", 300, 5.0, 24
    torch.set_num_threads(1)  # the threads are the clients; one intra-op thread each
    scales = [int(s) for s in args.scales.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(args.arch, scales, Path(tmp), seed=0)
        for name in args.paths.split(","):
            serve, trained_only = paths[name]
            pool = request_pool(scales, args.pool, seed=1, trained_only=trained_only)
            rows[name] = soak(serve, pool, args.threads, args.requests, args.seconds,
                              warmup=min(args.requests // 10, 20 * len(pool)))
            r = rows[name]
            print(f"{name:10s} {r['requests']:6d} requests in {r['seconds']:6.1f} s: {r['requests_per_s']:8.1f}/s, "
                  f"p50 {r['p50_ms']:7.2f} ms, p99 {r['p99_ms']:7.2f} ms, memory {r['memory_start_mb']:.0f} -> "
                  f"{r['memory_end_mb']:.0f} MB ({r['memory_growth_pct']:+.2f}%), wrong {r['wrong']}", flush=True)
    print(f"\n{args.arch} at {args.scales}, {args.threads} threads, torch {torch.__version__}")
    print("| path | requests | requests/s | p50 ms | p99 ms | memory after warm-up -> end (MB) | growth | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['memory_start_mb']} -> {r['memory_end_mb']} | {r['memory_growth_pct']:+.2f}% | {r['wrong']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"arch": args.arch, "scales": scales, "threads": args.threads,
                                              "torch": torch.__version__, "paths": rows}, indent=1))
    wrong = sum(r["wrong"] for r in rows.values())
    grew = [n for n, r in rows.items() if r["memory_growth_pct"] >= 2.0]
    if wrong:
        print(f"FAIL: {wrong} answers differ from the same input served alone")
    if grew and not args.quick:
        print(f"FAIL: resident memory grew 2% or more on {', '.join(grew)}")
    ok = not wrong and (args.quick or not grew)
    print("every answer right" if not wrong else "", "; memory flat" if not grew else "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
