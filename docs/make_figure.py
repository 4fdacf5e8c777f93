"""Draw docs/figures/routing.png: the picture of Scale-Specific BN routing in the README.

    python docs/make_figure.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

SCALES = [(224, "#1f77b4"), (192, "#ff7f0e"), (128, "#2ca02c")]
OUT = Path(__file__).with_name("figures") / "routing.png"


def box(ax, x, y, w, h, text, color="#eeeeee", edge="#555555", size=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor=edge, linewidth=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, start, end, color):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, color=color,
                                 linewidth=1.6, shrinkA=2, shrinkB=2, connectionstyle="arc3,rad=0.0"))


def main() -> None:
    fig, ax = plt.subplots(figsize=(9.6, 3.6), dpi=120)
    ax.set_xlim(0, 10.4)
    ax.set_ylim(0, 3.9)
    ax.axis("off")
    ys = [2.85, 1.75, 0.65]
    for (size, color), y in zip(SCALES, ys):  # the inputs, drawn to scale
        side = 0.75 * size / 224
        ax.add_patch(plt.Rectangle((0.55 - side / 2, y + 0.2 - side / 2), side, side, facecolor=color,
                                   alpha=0.25, edgecolor=color, linewidth=1.5))
        ax.text(0.55, y + 0.2, f"{size}²", ha="center", va="center", fontsize=9, color=color, weight="bold")
    ax.text(0.55, 3.75, "input", ha="center", fontsize=9)
    box(ax, 1.5, 1.35, 1.3, 1.4, "conv\n(shared)")
    ax.text(2.15, 3.75, "weights: one copy", ha="center", fontsize=9)
    box(ax, 3.6, 0.35, 2.4, 3.25, "", color="#fafafa")
    ax.text(4.8, 3.75, "Scale-Specific BN: one branch per scale", ha="center", fontsize=9)
    for (size, color), y in zip(SCALES, ys):
        box(ax, 3.8, y - 0.05, 2.0, 0.6, f"BN branch {size}\nmean, var, γ, β", color=color + "33", edge=color, size=8)
    box(ax, 6.8, 1.35, 1.3, 1.4, "conv\n(shared)")
    box(ax, 8.9, 1.35, 1.3, 1.4, "… same for\nevery BN")
    for (_, color), y in zip(SCALES, ys):
        arrow(ax, (0.95, y + 0.2), (1.5, 2.05 + (y - 1.75) * 0.35), color)
        arrow(ax, (2.8, 2.05 + (y - 1.75) * 0.35), (3.8, y + 0.25), color)
        arrow(ax, (5.8, y + 0.25), (6.8, 2.05 + (y - 1.75) * 0.35), color)
        arrow(ax, (8.1, 2.05 + (y - 1.75) * 0.35), (8.9, 2.05 + (y - 1.75) * 0.35), color)
    ax.text(5.2, 0.05, "each call is routed by its own image size (an in-between size takes the nearest branch); "
            "training runs every scale and sums the losses", ha="center", fontsize=8, style="italic")
    fig.tight_layout()
    fig.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
