"""How far apart the branches' statistics are, layer by layer (the paper's Figure 4).

Divergence of two branches at one BN layer: the symmetrised KL divergence between the
per-channel Gaussians N(running_mean, running_var) of the two branches,
``0.5 * (KL(p || q) + KL(q || p))``, averaged over channels.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..core.model import context_of, scale_specific_layers, unwrap
from ..core.scales import scale_key

Row = Dict[str, Union[str, int, float]]


def _gaussian_kl(mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1)


def symmetric_kl(mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor,
                 eps: float = 1e-5) -> float:
    """Channel-averaged symmetrised KL between two sets of per-channel Gaussians."""
    mu_a, mu_b = mu_a.double(), mu_b.double()
    var_a, var_b = var_a.double() + eps, var_b.double() + eps
    kl = 0.5 * (_gaussian_kl(mu_a, var_a, mu_b, var_b) + _gaussian_kl(mu_b, var_b, mu_a, var_a))
    return float(kl.mean())


def branch_divergence(model: nn.Module, plot: Optional[str] = None) -> List[Row]:
    """One row per (BN layer, pair of scales), layers in network order.

    Row keys: ``layer`` (qualified name), ``index`` (0-based position), ``depth`` (index / (n-1)),
    ``pair`` ("224-128"), ``divergence``. Pass ``plot="fig.png"`` to also write a plot of
    divergence against depth, one line per pair (needs matplotlib).
    """
    ctx = context_of(model)
    inner = unwrap(model)
    layers = [(name, layer) for name, layer in scale_specific_layers(inner)
              if all(hasattr(b, "running_mean") and b.running_mean is not None
                     for b in layer.branches.values())]
    rows: List[Row] = []
    n = len(layers)
    for index, (name, layer) in enumerate(layers):
        for (sa, ka), (sb, kb) in itertools.combinations(zip(ctx.scales, ctx.keys), 2):
            a, b = layer.branches[ka], layer.branches[kb]
            rows.append({
                "layer": name, "index": index, "depth": index / max(n - 1, 1),
                "pair": f"{scale_key(sa)}-{scale_key(sb)}",
                "divergence": symmetric_kl(a.running_mean, a.running_var, b.running_mean, b.running_var),
            })
    if plot:
        plot_divergence(rows, plot)
    return rows


def plot_divergence(rows: List[Row], path: str, title: str = "S-BN branch divergence") -> None:
    """Divergence against layer index, one line per pair of scales; writes a PNG."""
    try:  # a Figure of its own, not pyplot's: the caller's backend and open figures are left alone
        from matplotlib.figure import Figure
    except ImportError as e:
        from .._utils.environment import install_command

        raise ValueError(f"plotting needs matplotlib: {install_command('plot')}") from e
    if not any(float(r["divergence"]) > 0 for r in rows):
        raise ValueError("every branch still has the same statistics (a freshly converted model): "
                         "there is no divergence to plot; train or calibrate first")
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for pair in dict.fromkeys(r["pair"] for r in rows):
        pts = [(r["index"], r["divergence"]) for r in rows if r["pair"] == pair]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=pair)
    ax.set_xlabel("BN layer (network order)")
    ax.set_ylabel("symmetric KL, mean over channels")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(title="scales")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
