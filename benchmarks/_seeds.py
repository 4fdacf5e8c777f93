"""Jobs (arm x seed) in a JSONL file, and their mean ± standard error by arm and size: the
table and the plot the multi-seed benchmarks share (not part of the package)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple


def read_jobs(path: Path) -> list:
    """Every finished job of a JSONL file (none when it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def mean_se(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error (``nan`` for one value)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def by_size(runs: List[dict], key: str, sizes: Iterable[int]) -> Dict[int, Tuple[float, float]]:
    """``{size: (mean, se)}`` of ``run[key][str(size)]`` over the runs (seeds) of one arm."""
    return {s: mean_se([r[key][str(s)] for r in runs]) for s in sizes}


def markdown(table: dict, key: str, sizes: Sequence[int]) -> str:
    """``| arm | seeds | size... |`` rows of ``mean ± se`` from ``table[arm][key][size]``."""
    lines = ["| arm | seeds | " + " | ".join(f"{s}" for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for arm, row in table.items():
        cells = [f"{m:.1f} ± {se:.1f}" for m, se in (row[key][s] for s in sizes)]
        lines.append(f"| {arm} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, key: str, sizes: Sequence[int], path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """One error-bar line per arm (dashed for ``interpolate`` rows), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, row in table.items():
        means = [row[key][s][0] for s in sizes]
        ses = [0 if math.isnan(row[key][s][1]) else row[key][s][1] for s in sizes]
        ax.errorbar(sizes, means, yerr=ses, marker="o", capsize=3, label=arm,
                    linestyle="--" if "interpolate" in arm else "-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def json_table(table: dict, key: str) -> str:
    """The table as JSON (sizes as string keys)."""
    return json.dumps({arm: {**row, key: {str(s): v for s, v in row[key].items()}} for arm, row in table.items()},
                      indent=1)


def run_missing(jobs_file: Path, arms: str, seeds: str, load_data, run_job, key: str) -> None:
    """Run each (arm, seed) not yet in ``jobs_file`` (comma-separated lists), appending its row as
    it finishes; ``load_data()`` is called once, only when something is left to run."""
    done = {(r["arm"], r["seed"]) for r in read_jobs(jobs_file)}
    todo = [(a, int(s)) for s in seeds.split(",") for a in arms.split(",") if (a, int(s)) not in done]
    data = load_data() if todo else None
    for arm, seed in todo:
        result = run_job(arm, seed, data)
        with open(jobs_file, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{arm} seed {seed}: " + ", ".join(f"{s}: {v:.1f}" for s, v in result[key].items())
              + f" ({result['train_seconds']:.0f} s)", flush=True)
