"""Convert every timm and torchvision classification model that has a batch norm; check it.

With --contract, also: a train-mode sampling step with backward, FX feature extraction that
routes per scale, torch.jit.script wherever the original model scripts, and (issue 13) an FX
trace in train mode whose backward reaches every parameter, an FX trace in eval mode that
scripts and matches eager, and a pickle round trip that still routes and samples.

For each model (random init): convert at three scales (native, ~0.75x, ~0.5x, multiples of 8),
check eval equivalence against the original at every scale, then give every branch different
statistics and check that each per-scale export loads with ``strict=True`` into the unmodified
model and reproduces the converted output at that scale. One CSV row per model.

    python benchmarks/zoo_coverage.py --workers 14 --device cuda --out benchmarks/results/zoo_coverage.csv
    python benchmarks/zoo_coverage.py --only resnet18,test_efficientnet     # a few, on CPU
    python benchmarks/zoo_coverage.py --contract --only @ok_models.txt --out benchmarks/results/zoo_contract.csv

Runs in worker processes over shards; rows are appended as they finish, and a rerun skips the
models already in the CSV (``--deadline`` stops cleanly before a host's time limit).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from _host import write_atomic  # benchmarks/ is on sys.path when a script here runs

FIELDS = [
    "model", "source", "status", "scales", "layers", "equiv_max_rel_diff", "export_max_rel_diff",
    "traced", "seconds", "reason",
]
# --contract adds the checks timm/torchvision run on their own models
CONTRACT_FIELDS = ["train_step", "fx_extract", "jit_script", "fx_train_grads", "fx_trace_script",
                   "pickle", "commit"]
TOL = 1e-5


def round8(v: float) -> int:
    return max(8, int(round(v / 8.0)) * 8)


def model_list():
    import timm
    import torchvision

    names = [(n, "timm") for n in timm.list_models()]
    names += [(n, "torchvision") for n in torchvision.models.list_models(module=torchvision.models)]
    return names


def native_size(model, name, source):
    if source == "timm":
        h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
        return int(h), int(w)
    import torchvision

    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms
        crop = t.keywords.get("crop_size", 224)
    except Exception:  # noqa: BLE001
        crop = 224
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    return int(crop), int(crop)


def flat(out):
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat(v)]
    return []


def rel_diff(a, b):
    diffs = []
    for x, y in zip(flat(a), flat(b)):
        scale = max(float(x.detach().abs().max()), 1e-12)
        diffs.append(float((x.detach().float() - y.detach().float()).abs().max()) / scale)
    return max(diffs) if diffs else float("nan")


class Timeout(Exception):
    pass


RESPAWN = 3  # a worker's exit code: start a fresh worker on the rest of its shard


def out_of_memory(e: BaseException) -> bool:
    """The host ran out (or hit --max-memory-gb): says nothing about the model."""
    from sct_convert.conversion.probe import out_of_memory

    # safetensors' serializer panics ("PyObject pointer is null") when Python cannot allocate
    # the bytes it returns
    return out_of_memory(e) or (type(e).__name__ == "PanicException" and "pointer is null" in str(e))


def contract_checks(model, original, ctx, inputs, row, source):
    """Train-mode sampling + SCTLoss backward; FX extraction routes; scripts if the original does."""
    import warnings

    import torch
    import torch.fx
    from timm.models import _features_fx as timm_fx
    from torchvision.models import feature_extraction as tv_fx

    import sct_convert as sct

    timed_out = []

    def attempt(key, fn):
        if timed_out:  # the model's time is up: the alarm will not fire again
            row[key] = "timeout: not run"
            return
        model.eval()  # a failed extraction can leave the model in train mode (torchvision)
        try:
            row[key] = fn()
        except Timeout:
            timed_out.append(key)
            row[key] = "timeout: over the model's time limit"
        except Exception as e:  # noqa: BLE001 - recorded per model
            if out_of_memory(e):
                # the host's limit (--max-memory-gb), not a verdict on the model: rerun it bigger
                row[key] = "skip: over the host's memory limit"
            else:
                row[key] = f"fail: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
        model.eval()

    def train_step():
        from sct_convert.training.step import main_logits

        m = copy.deepcopy(model).train()
        out = m(inputs[0])
        logits = [main_logits(o) for o in out]
        sum(lg.float().mean() for lg in logits).backward()
        ok = all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        return "ok" if ok and len(out) == len(ctx.scales) else "fail: non-finite grads"

    def fx_extract():
        # timm's extractor knows timm's untraceable leaves; torchvision's is what tv models use
        fx = timm_fx if source == "timm" else tv_fx
        make, get_graph_node_names = fx.create_feature_extractor, fx.get_graph_node_names
        plain = {s: sct.extract(model, s).eval() for s in ctx.scales}
        try:
            _, plain_nodes = get_graph_node_names(plain[ctx.scales[0]])
            make(plain[ctx.scales[0]], [plain_nodes[-1]])
        except Exception:  # noqa: BLE001 - decides only whether the check applies
            return "n/a (original does not trace)"
        # nodes inside a BN layer (e.g. BatchNormAct2d's act) are one routed call once converted
        _, converted_nodes = get_graph_node_names(model)
        nodes = [n for n in plain_nodes if n in set(converted_nodes)]
        # the last node too keeps both graphs whole: a truncated graph drops in-place ops that
        # run after the node in eager (SiLU(inplace=True)) in one graph and not the other
        node, last = nodes[len(nodes) // 2], nodes[-1]
        fe = make(model, [node, last])
        worst = 0.0
        for s, x in zip(ctx.scales, inputs):
            with torch.no_grad():
                want = make(plain[s], [node, last])(x)[node]
                worst = max(worst, rel_diff(want, fe(x)[node]))
        return "ok" if worst <= TOL else f"fail: diff {worst:.1e}"

    def jit_script():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.jit.script(copy.deepcopy(original))
            except Exception:  # noqa: BLE001
                return "n/a (original does not script)"
            scripted = torch.jit.script(model)
        with torch.no_grad():
            worst = max(rel_diff(model(x), scripted(x)) for x in inputs)
        return "ok" if worst <= TOL else f"fail: diff {worst:.1e}"

    def tracer():
        # timm models: timm's no-trace modules and functions are leaves, as in timm's FX tools
        from timm.layers import get_notrace_functions, get_notrace_modules

        leaves = tuple(get_notrace_modules()) if source == "timm" else ()

        class Tracer(torch.fx.Tracer):
            def __init__(self):
                fns = tuple(f for f in get_notrace_functions() if callable(f)) if source == "timm" else ()
                super().__init__(autowrap_functions=fns)

            def is_leaf_module(self, m, name):
                return isinstance(m, leaves) or super().is_leaf_module(m, name)

        return Tracer()

    def traces(module):
        try:
            return torch.fx.GraphModule(module, tracer().trace(module))
        except Exception:  # noqa: BLE001 - decides only whether the check applies
            return None

    def fx_train_grads():
        if traces(copy.deepcopy(original).train()) is None:
            return "n/a (original does not trace)"
        m = copy.deepcopy(model).train()
        traced = torch.fx.GraphModule(m, tracer().trace(m))
        out = traced(inputs[0])
        if not isinstance(out, sct.ScaleOutputs) or len(out) != len(ctx.scales):
            return f"fail: traced train forward returned {type(out).__name__}, not every scale"
        # SCTLoss, so aux heads (GoogLeNet, Inception-v3) are in the loss as in training
        sct.SCTLoss(lambda logits, _: logits.float().mean())(out, None).backward()
        missing = [n for n, p in traced.named_parameters() if p.requires_grad and p.grad is None]
        return "ok" if not missing else f"fail: no gradient for {len(missing)} (e.g. {missing[0]})"

    def fx_trace_script():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain_graph = traces(copy.deepcopy(original).eval())
            if plain_graph is None:
                return "n/a (original does not trace)"
            try:
                torch.jit.script(plain_graph)
            except Exception:  # noqa: BLE001
                return "n/a (original's traced graph does not script)"
            traced = torch.fx.GraphModule(model, tracer().trace(model))
            scripted = torch.jit.script(traced)
        with torch.no_grad():
            worst = max(max(rel_diff(model(x), traced(x)), rel_diff(model(x), scripted(x))) for x in inputs)
        return "ok" if worst <= TOL else f"fail: diff {worst:.1e}"

    def pickle_round_trip():
        import pickle

        copied = pickle.loads(pickle.dumps(model))
        copied.eval()
        with torch.no_grad():
            worst = max(rel_diff(model(x), copied(x)) for x in inputs)
        if worst > TOL:
            return f"fail: diff {worst:.1e}"
        copied.train()
        with torch.no_grad():
            out = copied(inputs[0])
        if not isinstance(out, sct.ScaleOutputs) or len(out) != len(ctx.scales):
            return "fail: the copy no longer samples in train mode"
        return "ok"

    attempt("train_step", train_step)
    attempt("fx_extract", fx_extract)
    attempt("jit_script", jit_script)
    attempt("fx_train_grads", fx_train_grads)
    attempt("fx_trace_script", fx_trace_script)
    attempt("pickle", pickle_round_trip)


def check_model(name, source, device, batch, contract=False):
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    import sct_convert as sct
    from sct_convert._utils.files import saveable
    from sct_convert.checkpoints.files import plain_state_dict
    from sct_convert.checkpoints.weights import with_module_metadata
    from sct_convert.checkpoints.zoo import create_model

    row = {"model": name, "source": source}
    model, _ = create_model(name, source)
    if not any(sct.is_batch_norm(m) for m in model.modules()):
        row.update(status="no_bn")
        return row
    h, w = native_size(model, name, source)
    sizes = [(h, w), (round8(0.75 * h), round8(0.75 * w)), (round8(0.5 * h), round8(0.5 * w))]
    scales = [s[0] if s[0] == s[1] else s for s in sizes]
    scales = list(dict.fromkeys(scales))
    row["scales"] = " ".join(f"{s[0]}x{s[1]}" if isinstance(s, tuple) else str(s) for s in scales)
    in_chans = model.pretrained_cfg.get("input_size", (3,))[0] if source == "timm" else 3
    model = model.to(device).eval()
    original = copy.deepcopy(model)
    try:
        sct.convert(model, scales)
    except sct.ConversionError as e:
        row.update(status="refused", reason=" ".join(str(e).split())[:400])
        return row
    ctx = sct.context_of(model)
    row["layers"] = len(ctx.report.converted)
    row["traced"] = ctx.report.traced
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, in_chans, hh, ww, generator=g).to(device) for hh, ww in ctx.sizes]
    model.eval()
    with torch.no_grad():
        row["equiv_max_rel_diff"] = max(rel_diff(original(x), model(x)) for x in inputs)
        # Make every branch different, so an export that took the wrong branch is caught.
        for _, layer in sct.scale_specific_layers(model):
            for branch in layer.branches.values():
                for t in list(branch.parameters()) + list(branch.buffers()):
                    if t.is_floating_point():
                        t.mul_(1 + 0.05 * torch.rand(t.shape, generator=g).to(t.device))
        export_diffs = []
        for s, x in zip(ctx.scales, inputs):
            blob = st_save(saveable({k: v.cpu() for k, v in plain_state_dict(model, s).items()}))
            plain = copy.deepcopy(original)
            plain.load_state_dict(with_module_metadata(st_load(blob), plain), strict=True)
            plain.to(device).eval()
            export_diffs.append(rel_diff(model(x), plain(x)))
        row["export_max_rel_diff"] = max(export_diffs)
    ok = row["equiv_max_rel_diff"] <= TOL and row["export_max_rel_diff"] <= TOL
    row["status"] = "ok" if ok else "mismatch"
    if contract:
        contract_checks(model, original, ctx, inputs, row, source)
    return row


def run_worker(args, names):
    import resource

    import torch

    if args.max_memory_gb:  # a model too big for the host is a skip row, not an OOM kill
        limit = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import warnings

    warnings.filterwarnings("ignore")

    def alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)
    out = Path(args.part)
    new = not out.exists() or out.stat().st_size == 0
    done = {(r["model"], r["source"]) for r in read_rows(out)}  # a respawned worker resumes
    names = [n for n in names if n not in done]
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields(args))
        if new:
            writer.writeheader()
        for checked, (name, source) in enumerate(names):
            if time.time() > args.deadline_at:
                break
            # the parent reads this if the process dies or hangs outside Python's reach
            write_atomic(Path(args.part + ".current"), f"{name},{source},{time.time()},{checked}")
            t0 = time.time()
            signal.alarm(args.model_timeout)
            try:
                row = check_model(name, source, args.device, args.batch, args.contract)
            except Timeout:
                row = {"model": name, "source": source, "status": "timeout",
                       "reason": f"over {args.model_timeout}s"}
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - recorded per model (pyo3 panics are BaseException)
                if out_of_memory(e):
                    row = {"model": name, "source": source, "status": "skip",
                           "reason": f"over the host's memory limit ({args.max_memory_gb} GB): rerun on a bigger host"}
                else:
                    row = {"model": name, "source": source, "status": "error",
                           "reason": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            finally:
                signal.alarm(0)
            row["seconds"] = f"{time.time() - t0:.1f}"
            if args.contract:
                row["commit"] = os.environ.get("SCT_SWEEP_COMMIT", "")
            for k in ("equiv_max_rel_diff", "export_max_rel_diff"):
                if isinstance(row.get(k), float):
                    row[k] = f"{row[k]:.2e}"
            memory_skip = row["status"] == "skip" or any(
                str(row.get(k, "")).startswith("skip") for k in CONTRACT_FIELDS)
            if memory_skip and checked > 0:
                # earlier models can leave this process too big (allocator, oneDNN caches):
                # a fresh worker retries the model first, and only its verdict is recorded
                sys.exit(RESPAWN)
            writer.writerow(row)
            f.flush()
            if memory_skip:
                # after a failed big allocation the process can stay too big for the next
                # model (oneDNN then fails everywhere): exit, and the parent starts a fresh one
                sys.exit(RESPAWN)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


def fields(args):
    return FIELDS + (CONTRACT_FIELDS if args.contract else [])


def read_rows(path):
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/zoo_coverage.csv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--only", default=None,
                   help="comma list of model names (NAME or SOURCE/NAME), or @FILE with one per line")
    p.add_argument("--source", choices=["timm", "torchvision"], default=None)
    p.add_argument("--model-timeout", type=int, default=240)
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; stop starting new models after")
    p.add_argument("--contract", action="store_true",
                   help="also check train step, FX feature extraction and torch.jit.script")
    p.add_argument("--grace", type=float, default=60, help="seconds after --deadline before kill")
    p.add_argument("--max-memory-gb", type=float, default=0,
                   help="per worker (RLIMIT_DATA); a model over it is recorded as a skip")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    names = model_list()
    if args.source:
        names = [n for n in names if n[1] == args.source]
    if args.only and args.only.startswith("@"):
        args.only = ",".join(Path(args.only[1:]).read_text().split())
    if args.only:  # NAME (any library) or SOURCE/NAME (timm/resnet18, torchvision/resnet18)
        wanted = set(args.only.split(","))
        names = [n for n in names if n[0] in wanted or f"{n[1]}/{n[0]}" in wanted]
    done = {(r["model"], r["source"]) for r in read_rows(args.out)}
    todo = [n for n in names if n not in done]
    random.Random(0).shuffle(todo)  # spread the big models over the shards

    if args.worker is not None:
        run_worker(args, todo[args.worker::args.workers])
        return
    deadline_at = time.time() + args.deadline
    parts = [f"{args.out}.part{i}" for i in range(args.workers)]
    # TorchScript re-reads sources at script time: run the sweep from a tree nobody edits
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    env = dict(os.environ, PYTHONUNBUFFERED="1", SCT_SWEEP_COMMIT=commit)

    def spawn(i):
        return subprocess.Popen(
            [sys.executable, __file__, "--out", args.out, "--device", args.device,
             "--workers", str(args.workers), "--worker", str(i), "--part", parts[i],
             "--threads", str(args.threads), "--batch", str(args.batch),
             "--model-timeout", str(args.model_timeout), "--max-memory-gb", str(args.max_memory_gb),
             "--deadline-at", str(deadline_at)] + (["--only", args.only] if args.only else [])
            + (["--contract"] if args.contract else []) + (["--source", args.source] if args.source else []),
            env=env)

    def current(i):
        marker = Path(parts[i] + ".current")
        if not marker.exists():
            return None
        fields_ = marker.read_text().split(",")
        if len(fields_) != 4:  # a marker from an older version of this script
            return None
        name, source, started, checked = fields_
        return name, source, float(started), int(checked)

    def record_lost(i, why):
        """A worker died or hung on a model (a native abort, a deadlock after a failed
        allocation): give that model a row so the fresh worker moves past it. If the
        worker had checked other models first, the fresh worker retries it instead."""
        running = current(i)
        if running is None:
            return
        name, source, started, checked = running
        if any((r["model"], r["source"]) == (name, source) for r in read_rows(parts[i])):
            return  # it died after writing its row
        if checked > 0:
            return
        with open(parts[i], "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields(args))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow({"model": name, "source": source, "status": "skip",
                             "seconds": f"{time.time() - started:.1f}",
                             "reason": f"worker {why} on this model (native abort or hang, usually out "
                                       "of memory): rerun on a bigger host"})

    def respawn(i):
        # the old marker's start time would make the watchdog kill the new worker before
        # it has imported torch and written a marker of its own
        Path(parts[i] + ".current").unlink(missing_ok=True)
        return spawn(i)

    procs = {i: respawn(i) for i in range(args.workers)}
    print(f"{len(todo)} models to check ({len(done)} already in {args.out}), {args.workers} workers",
          flush=True)
    while procs:  # models still running at the deadline (+grace) are redone next run
        time.sleep(1.0)
        for i, proc in list(procs.items()):
            now, running = time.time(), current(i)
            if proc.poll() is None:
                if now > deadline_at + args.grace:
                    proc.kill()
                    del procs[i]
                elif running and now - running[2] > args.model_timeout + 60:
                    proc.kill()  # SIGALRM cannot reach a thread stuck in native code
                    proc.wait()
                    record_lost(i, "hung")
                    procs[i] = respawn(i)
            elif proc.returncode == RESPAWN and now < deadline_at:
                procs[i] = respawn(i)
            elif proc.returncode != 0 and now < deadline_at and running:
                record_lost(i, f"died (exit {proc.returncode})")
                procs[i] = respawn(i)
            else:
                del procs[i]
    for part in parts:
        Path(part + ".current").unlink(missing_ok=True)
    rows = read_rows(args.out)
    for part in parts:
        rows += read_rows(part)
        if Path(part).exists():
            os.unlink(part)
    rows = list({(r["model"], r["source"]): r for r in reversed(rows)}.values())  # first row per model
    rows.sort(key=lambda r: (r["source"], r["model"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields(args))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(Path(args.out), text.getvalue())  # the CSV holds every earlier chunk's rows
    summarize(rows, len(names))


def summarize(rows, total):
    from collections import Counter

    with_bn = [r for r in rows if r["status"] != "no_bn"]
    counts = Counter(r["status"] for r in with_bn)
    for source in ("timm", "torchvision"):
        c = Counter(r["status"] for r in with_bn if r["source"] == source)
        print(f"{source:12s} with BN: {sum(c.values()):4d}  " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    print(f"checked {len(rows)}/{total} models; with BN {len(with_bn)}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for key in CONTRACT_FIELDS:
        values = Counter(str(r.get(key) or "")[:4] for r in with_bn if r["status"] == "ok")
        if any(values):
            print(f"{key:11s}: " + ", ".join(f"{k or '-'}={v}" for k, v in sorted(values.items())))


if __name__ == "__main__":
    main()
