"""mkdocs hook: the figures that benchmarks write to ``benchmarks/results/`` are published with
the site as ``figures/<name>.png``, so a page shows the plot its benchmark last wrote (no copy
to keep in step)."""
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    return files
