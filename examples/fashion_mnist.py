"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, as padded 32x32 tensors.

Looked up in $FASHION_MNIST_DIR, ./.devdata/fashion-mnist, then /usr/share/datasets/fashion-mnist.
Install with ``apt-get install -y dataset-fashion-mnist``; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530
CANDIDATES = [os.environ.get("FASHION_MNIST_DIR", ""), ".devdata/fashion-mnist",
              "/usr/share/datasets/fashion-mnist"]


def find_dir() -> Path:
    for c in CANDIDATES:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").exists():
            return Path(c)
    raise SystemExit(
        "Fashion-MNIST not found: run `apt-get install -y dataset-fashion-mnist` (Debian) or set "
        "FASHION_MNIST_DIR to a folder with the four *-ubyte.gz IDX files"
    )


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "train", device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 32, 32) normalized, zero-padded from 28x28 (value of black), and labels."""
    root = find_dir()
    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(_idx(root / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div_(255)
    y = torch.from_numpy(_idx(root / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    x = (F.pad(x.unsqueeze(1), (2, 2, 2, 2)) - MEAN) / STD
    return x.to(device), y.to(device)


def augment(x: torch.Tensor, generator: torch.Generator = None) -> torch.Tensor:
    """Random horizontal flip and random 4-pixel translation per sample (CIFAR-style)."""
    n = x.shape[0]
    rng = generator.device if generator is not None else x.device  # draw where the generator lives
    flip = torch.rand(n, generator=generator, device=rng).to(x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shift = torch.randint(-4, 5, (n, 2), generator=generator, device=rng).to(x.device).float()
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift * 2 / x.shape[-1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Test-time resize: bilinear with antialias, as SCT's sampling does."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
