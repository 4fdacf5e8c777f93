"""Compare the outcomes of two sweep CSVs (export_sweep.py or zoo_coverage.py --contract) on the
models they share: a refactor must keep every outcome.

    python benchmarks/compare_sweeps.py benchmarks/results/export_sweep_final_issue33.csv NEW.csv
"""
from __future__ import annotations

import argparse
import csv

OUTCOMES = ("per_scale", "switchable", "status", "train_step", "fx_extract", "jit_script", "fx_train_grads",
            "fx_trace_script", "pickle")
ERRORS = ("per_scale_max_rel_err", "switchable_max_rel_err", "equiv_max_rel_diff", "export_max_rel_diff")


def rows(path: str) -> dict:
    with open(path) as f:
        return {(r["source"], r["model"]): r for r in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args()
    before, after = rows(args.before), rows(args.after)
    shared = sorted(set(before) & set(after))
    changed, worst = [], 0.0
    for key in shared:
        for col in OUTCOMES:
            if col in after[key] and before[key].get(col) != after[key][col]:
                changed.append(f"{key[0]}/{key[1]} {col}: {before[key].get(col)} -> {after[key][col]}")
        for col in ERRORS:
            try:
                worst = max(worst, float(after[key].get(col) or 0))
            except ValueError:
                pass
    print(f"{len(shared)} models in both ({len(after)} in {args.after}); "
          f"{len(changed)} outcomes changed; max error in {args.after}: {worst:.1e}")
    for line in changed:
        print("  " + line)


if __name__ == "__main__":
    main()
