"""The result of :func:`sct_convert.evaluate`: one row per (scale, arm), and its writers.

A report renders as CSV, Markdown (with the notes saying what was measured) or JSON, and plots
accuracy against size and against batch-1 latency.
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._utils.files import PathLike, atomic_write
from ..core.scales import parse_key, pixels as scale_pixels

COLUMNS = ("scale", "arm", "top1", "top5", "images", "latency_ms", "latency_ms_b32", "relative_macs", "cascade_of")


@dataclass
class ScaleResult:
    """One (scale, arm) row: accuracy in percent, per-image latency in ms (batch 1 and 32) and,
    for converted arms, MACs per image relative to one pass at the largest scale. A cascade's row
    names the arm it was fitted on in ``cascade_of`` (its ``scale`` reads ``"cascade"``, its MACs
    are the mean over the images)."""

    scale: str
    arm: str
    top1: float
    top5: float
    images: int
    latency_ms: Optional[float] = None
    latency_ms_b32: Optional[float] = None
    relative_macs: Optional[float] = None
    cascade_of: Optional[str] = None

    @property
    def is_cascade(self) -> bool:
        return self.cascade_of is not None


@dataclass
class EvaluationReport:
    """The rows of :func:`evaluate`, what they were measured on, and writers for each format.

    Args:
        rows: one :class:`ScaleResult` per (scale, arm), in the order measured.
        notes: what the rows were measured on (images, calibration source, preprocessing).
        data_config: timm's data config the images were preprocessed with.
    """

    rows: List[ScaleResult]
    notes: List[str] = field(default_factory=list)
    data_config: Dict[str, Any] = field(default_factory=dict)

    def by_arm(self) -> Dict[str, List[ScaleResult]]:
        arms: Dict[str, List[ScaleResult]] = {}
        for row in self.rows:
            arms.setdefault(row.arm, []).append(row)
        return arms

    def to_csv(self) -> str:
        out = _io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
        return out.getvalue()

    def to_markdown(self) -> str:
        def cell(v: Optional[float], digits: int) -> str:
            return "" if v is None else f"{v:.{digits}f}"

        lines = ["| scale | arm | top-1 % | top-5 % | images | ms/image b1 | ms/image b32 | MACs vs largest |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r.scale} | {r.arm} | {r.top1:.1f} | {r.top5:.1f} | {r.images} | "
                  f"{cell(r.latency_ms, 3)} | {cell(r.latency_ms_b32, 3)} | {cell(r.relative_macs, 3)} |"
                  for r in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"

    def to_json(self) -> str:
        return json.dumps({"rows": [asdict(r) for r in self.rows], "notes": self.notes,
                           "data_config": self.data_config}, indent=1, default=str)

    def write(self, path: PathLike) -> Path:
        """Write the report as ``.csv``, ``.md`` or ``.json`` (by suffix), atomically."""
        path = Path(path)
        render = {".csv": self.to_csv, ".md": self.to_markdown, ".json": self.to_json}.get(path.suffix)
        if render is None:
            raise ValueError(f"cannot write a report to {path.name}: use a .csv, .md or .json file")
        text = render()
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def plot(self, path: PathLike) -> Path:
        """A PNG: top-1 against size, and top-1 against batch-1 latency, one line per arm; with
        cascade rows, also top-1 against MACs (each single scale a point, each arm's cascades a curve)."""
        try:  # a Figure of its own, not pyplot's: the caller's backend and open figures are left alone
            from matplotlib.figure import Figure
        except ImportError as e:
            from .._utils.environment import install_command

            raise ValueError(f"plotting needs matplotlib: {install_command('plot')}") from e
        cascades = [r for r in self.rows if r.is_cascade]
        fig = Figure(figsize=(15 if cascades else 10, 4))
        axes = fig.subplots(1, 3 if cascades else 2)
        by_size, by_speed = axes[0], axes[1]
        if cascades:
            _plot_compute(axes[2], self.rows)
        for arm, rows in self.by_arm().items():
            if rows[0].is_cascade:
                continue
            pixels = [scale_pixels(parse_key(r.scale)) for r in rows]
            by_size.plot([math.sqrt(p) for p in pixels], [r.top1 for r in rows], "o-", label=arm)
            timed = [r for r in rows if r.latency_ms is not None]
            if timed:
                by_speed.plot([r.latency_ms for r in timed], [r.top1 for r in timed], "o-", label=arm)
                for r in timed:
                    by_speed.annotate(r.scale, (r.latency_ms, r.top1), fontsize=7, xytext=(3, 3),
                                      textcoords="offset points")
        by_size.set(xlabel="input size (sqrt of pixels)", ylabel="top-1 (%)", title="accuracy by size")
        by_speed.set(xlabel="ms per image, batch 1", ylabel="top-1 (%)", title="accuracy by latency")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))



def _plot_compute(ax: Any, rows: List[ScaleResult]) -> None:
    """Top-1 against MACs: single scales as points, each arm's cascades as one curve."""
    curves: Dict[str, List[ScaleResult]] = {}
    for r in rows:
        if r.relative_macs is None:
            continue
        if r.is_cascade:
            curves.setdefault(r.cascade_of, []).append(r)
        else:
            ax.plot([r.relative_macs], [r.top1], "o", color="gray")
            ax.annotate(f"{r.arm} {r.scale}", (r.relative_macs, r.top1), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for arm, points in curves.items():
        points.sort(key=lambda r: r.relative_macs)
        ax.plot([r.relative_macs for r in points], [r.top1 for r in points], "s-", label=f"{arm} cascade")
    ax.set(xlabel="MACs per image / one pass at the largest scale", ylabel="top-1 (%)", title="accuracy by compute")
