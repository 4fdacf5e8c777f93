"""Export a zoo of converted models to ONNX, per scale and switchable; check each in onnxruntime.

For each model (random init, three scales: native, ~0.75x, ~0.5x, multiples of 8, as the zoo
sweep picks them): convert, give every branch different statistics, then write
- one static per-scale ONNX file (the plain architecture) at the smallest scale, and
- one switchable file (every scale, routed in the graph),
and compare onnxruntime with the eager converted model: the per-scale file at its scale, the
switchable file at every scale and, apart, at one size between the two largest (a failure there
says so). One CSV row per model,
with export seconds, file size and the max relative error; a failure names the operator or the
reason. With OpenVINO installed, each file is also run there against onnxruntime at the same
sizes (``*_openvino`` columns: ``ok`` within 1e-4, else what differs or fails). ``--int8`` adds
the int8 files (per-scale and switchable, calibrated on 16 random inputs; ``ok`` when onnxruntime
runs every branch quantized) and their OpenVINO check (top-1 agreement). Rows are appended as models finish and a rerun skips models already in the CSV.

    python benchmarks/export_sweep.py --only @benchmarks/results/zoo_sample.txt
    python benchmarks/export_sweep.py --only torchvision/resnet18,timm/resnet50
    python benchmarks/export_sweep.py --only @FILE --workers 14 --threads 1   # a many-core host
    python benchmarks/export_sweep.py --summary                                # the table of a CSV
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
import warnings
from pathlib import Path

FIELDS = ["model", "source", "scales", "per_scale", "per_scale_seconds", "per_scale_mb", "per_scale_max_rel_err",
          "switchable", "switchable_seconds", "switchable_mb", "switchable_max_rel_err", "commit", "torch",
          "onnxruntime", "per_scale_openvino", "switchable_openvino", "int8_per_scale", "int8_per_scale_openvino",
          "int8_switchable", "int8_switchable_openvino", "openvino"]
TOL = 1e-4


def short(e: BaseException) -> str:
    """One line naming the failing operator (torch.onnx's translation error) and the root cause."""
    import re

    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    text = " ".join(str(e).split())
    if "Status Message:" in text:  # onnxruntime nests each If's failure: the innermost one says why
        node = re.findall(r"while running (\w+) node", text)
        reason = text.rsplit("Status Message:", 1)[1].split(" was false. ")[-1].strip()  # drop file:line
        text = (f"{node[-1]} node: " if node else "") + reason
    text = text[:160]
    operator = next((m.group(1) for c in chain
                     for m in [re.search(r"target=(torch\.ops\.[\w.]+)", str(c))] if m), None)
    if operator is not None:
        root = chain[-1]
        text = f"{operator}: {type(root).__name__}: {' '.join(str(root).split())[:120]}"
    return f"fail: {type(e).__name__}: {text}"


def check(name: str, source: str, tmp: Path, threads: int, int8: bool = False) -> dict:
    import onnx
    import torch

    from sct_convert.deploy.int8 import branch_precision
    from sct_convert.deploy.openvino_check import openvino_problem, openvino_version

    if openvino_version() is None:
        openvino_problem = None  # noqa: F811 - no second runtime: the columns stay empty

    sys.path.insert(0, str(Path(__file__).parent))
    from zoo_coverage import native_size, round8

    import sct_convert as sct
    from sct_convert.deploy.api import onnx_max_relative_error
    from sct_convert.checkpoints.zoo import create_model

    row = {"model": name, "source": source}
    model, _ = create_model(name, source)
    h, w = native_size(model, name, source)
    sizes = list(dict.fromkeys([(h, w), (round8(0.75 * h), round8(0.75 * w)), (round8(0.5 * h), round8(0.5 * w))]))
    scales = [s[0] if s[0] == s[1] else s for s in sizes]
    row["scales"] = " ".join(f"{a}x{b}" for a, b in sizes)
    model = sct.convert(model.eval(), scales).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in sct.scale_specific_layers(model):
            for branch in layer.branches.values():
                for t in list(branch.parameters()) + list(branch.buffers()):
                    if t.is_floating_point():
                        t.mul_(1 + 0.05 * torch.rand(t.shape, generator=g))
    between = ((sizes[0][0] + sizes[1][0]) // 2, (sizes[0][1] + sizes[1][1]) // 2)
    # the switchable file is checked at the trained sizes, then apart at the in-between size, so
    # that a failure says which of the two it is
    jobs = [("per_scale", scales[-1], [[sizes[-1]]], None), ("switchable", None, [sizes, [between]], None)]
    if int8:
        calibration = torch.rand(16, 3, *sizes[0], generator=g)
        jobs += [("int8_per_scale", scales[-1], [[sizes[-1]]], calibration), ("int8_switchable", None, [sizes], calibration)]
    for kind, scale, groups, calibration in jobs:
        path = tmp / f"{name}_{kind}.onnx"
        start = time.perf_counter()
        try:  # OpenVINO apart, below: the export's seconds stay comparable with earlier sweeps
            sct.export_onnx(model, path, scale=scale, openvino=False, int8=calibration)
        except Exception as e:  # noqa: BLE001 - recorded per model
            row[kind] = short(e)
            continue
        if openvino_problem is not None:
            probes = [(hw, torch.rand(2, 3, *hw, generator=g)) for group in groups[:1] for hw in group]
            problem = openvino_problem(path, probes, int8=calibration is not None)
            row[f"{kind}_openvino"] = "ok" if problem is None else f"fail: {problem}"[:300]
        if calibration is not None:
            row[kind] = "ok" if all(p == "int8" for p in branch_precision(onnx.load(str(path))).values()) \
                else f"partly int8: {branch_precision(onnx.load(str(path)))}"
            path.unlink(missing_ok=True)
            continue
        row[f"{kind}_seconds"] = f"{time.perf_counter() - start:.1f}"
        files = [path, path.with_name(path.name + ".data")]  # the weights of a file over 2 GB
        row[f"{kind}_mb"] = f"{sum(f.stat().st_size for f in files if f.exists()) / 2**20:.1f}"
        errors = []
        for i, check_sizes in enumerate(groups):
            try:
                errors += onnx_max_relative_error(model, path, check_sizes, threads=threads)
            except Exception as e:  # noqa: BLE001
                where = f" at the in-between size {between[0]}x{between[1]} only" if i else ""
                row[kind] = short(e).replace("fail: ", f"fail{where}: runtime ", 1)
                break
        if errors:
            row[f"{kind}_max_rel_err"] = f"{max(errors):.1e}"
        if kind not in row:
            row[kind] = "ok" if max(errors) <= TOL else f"fail: max relative error {max(errors):.1e}"
        for f in files:
            f.unlink(missing_ok=True)
    return row


def run_one(job: tuple) -> dict:
    """One model in its own worker process (a crash or leak stays there)."""
    name, source, threads, commit, int8 = job
    import onnxruntime
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            row = check(name, source, Path(tmp), threads, int8)
    except Exception as e:  # noqa: BLE001 - conversion or model creation failed
        row = {"model": name, "source": source, "per_scale": short(e), "switchable": short(e)}
    from sct_convert.deploy.openvino_check import openvino_version

    row.update(commit=commit, torch=torch.__version__, onnxruntime=onnxruntime.__version__,
               openvino=openvino_version() or "")
    return row


def summary(path: Path) -> None:
    """Print the Markdown table the docs show: outcomes, errors, times and sizes per source."""
    import statistics

    rows = list(csv.DictReader(open(path, newline="")))

    def num(values):
        return [float(v) for v in values if v not in ("", None)]

    print("| source | models | per-scale ok | switchable ok | max rel. error | median export s (per-scale / switchable) "
          "| switchable MB / per-scale MB (median, max) |")
    print("|---|---|---|---|---|---|---|")
    for source in sorted({r["source"] for r in rows}) + ["all"]:
        part = [r for r in rows if source in ("all", r["source"])]
        errors = num([r["per_scale_max_rel_err"] for r in part] + [r["switchable_max_rel_err"] for r in part])
        size_ratio = [float(r["switchable_mb"]) / float(r["per_scale_mb"]) for r in part
                      if r["switchable_mb"] and r["per_scale_mb"] and float(r["per_scale_mb"]) > 0]
        print(f"| {source} | {len(part)} | {sum(r['per_scale'] == 'ok' for r in part)} "
              f"| {sum(r['switchable'] == 'ok' for r in part)} | {max(errors):.1e} "
              f"| {statistics.median(num(r['per_scale_seconds'] for r in part)):.1f} / "
              f"{statistics.median(num(r['switchable_seconds'] for r in part)):.1f} "
              f"| {statistics.median(size_ratio):.2f}, {max(size_ratio):.2f} |")
    extra = [k for k in ("per_scale_openvino", "switchable_openvino", "int8_per_scale", "int8_switchable",
                         "int8_per_scale_openvino", "int8_switchable_openvino") if any(r.get(k) for r in rows)]
    if extra:
        print()
        print("| source | " + " | ".join(k.replace("_", " ") + " ok" for k in extra) + " |")
        print("|---|" + "---|" * len(extra))
        for source in sorted({r["source"] for r in rows}) + ["all"]:
            part = [r for r in rows if source in ("all", r["source"])]
            print(f"| {source} | " + " | ".join(f"{sum(r.get(k) == 'ok' for r in part)} of "
                                              f"{sum(bool(r.get(k)) for r in part)}" for k in extra) + " |")
    for r in rows:
        if r["per_scale"] != "ok" or r["switchable"] != "ok":
            print(f"- {r['source']}/{r['model']}: per-scale {r['per_scale']}; switchable {r['switchable']}")
        for k in extra:
            if r.get(k) and r[k] != "ok":
                print(f"- {r['source']}/{r['model']}: {k.replace('_', ' ')} {r[k]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="SOURCE/NAME list, or @FILE with one per line")
    p.add_argument("--summary", action="store_true", help="print the table of --out's rows and exit")
    p.add_argument("--out", default="benchmarks/results/export_sweep.csv")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads per model")
    p.add_argument("--workers", type=int, default=1, help="models exported in parallel processes")
    p.add_argument("--int8", action="store_true", help="also the int8 files (per-scale and switchable)")
    args = p.parse_args()
    if args.summary:
        return summary(Path(args.out))
    if not args.only:
        p.error("--only is required (or --summary)")
    import multiprocessing
    import subprocess

    only = Path(args.only[1:]).read_text().split() if args.only.startswith("@") else args.only.split(",")
    pairs = [tuple(e.split("/", 1)[::-1]) if "/" in e else (e, "timm") for e in only]
    out = Path(args.out)
    done = set()
    if out.exists():
        with open(out, newline="") as f:
            done = {(r["model"], r["source"]) for r in csv.DictReader(f)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    jobs = [(name, source, args.threads, commit, args.int8) for name, source in pairs if (name, source) not in done]
    context = multiprocessing.get_context("spawn")
    with open(out, "a", newline="") as f, context.Pool(args.workers, maxtasksperchild=1) as pool:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if f.tell() == 0:
            writer.writeheader()
        for row in pool.imap_unordered(run_one, jobs):
            writer.writerow(row)
            f.flush()
            print(f"{row['source']}/{row['model']}: per-scale {row.get('per_scale')}, "
                  f"switchable {row.get('switchable')}", flush=True)


if __name__ == "__main__":
    main()
