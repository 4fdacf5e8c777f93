"""SCT for detection: torchvision's SSDlite trained at two transform sizes, reference loop unchanged.

The data is Fashion-MNIST as a detection task: canvases of 1-3 garments at random positions and
sizes, each with its box and class (1..10). The model is torchvision's
``ssdlite320_mobilenet_v3_large``; its transform resizes every image to ``fixed_size``, which is
the scale SCT trains and serves (``docs/dense.md``, Detection). The training loop is
torchvision's reference loop (``loss_dict = model(images, targets); losses = sum(...)``); the
only SCT change is the marked convert line.

    python examples/detection_sct.py --quick      # 69 s on 2 idle CPU cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402

import sct_convert as sct  # noqa: E402


def make_canvases(n: int, split: str = "train", size: int = 128,
                  seed: int = 0) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """``n`` RGB canvases in [0, 1] and torchvision detection targets (``boxes``, ``labels``).

    Each holds 1-3 garments of side size/4 to size/2 at random positions that do not overlap,
    boxed tightly around the garment's pixels (intensity > 0.1), labelled class + 1.
    """
    images, classes = fashion_mnist.load(split)
    raw = (images * fashion_mnist.STD + fashion_mnist.MEAN)[..., 2:30, 2:30]
    g = torch.Generator().manual_seed(seed)
    canvases, targets = [], []
    for _ in range(n):
        canvas = torch.zeros(size, size)
        boxes, labels, taken = [], [], torch.zeros(size, size, dtype=torch.bool)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            k = int(torch.randint(len(raw), (1,), generator=g))
            side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=g))
            top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
            if taken[top:top + side, left:left + side].any():
                continue  # keep boxes apart: every garment fully visible
            piece = F.interpolate(raw[k:k + 1], size=(side, side), mode="bilinear", align_corners=False,
                                  antialias=True)[0, 0]
            mask = piece > 0.1
            if not mask.any():
                continue
            canvas[top:top + side, left:left + side] = torch.where(mask, piece, 0.0)
            taken[top:top + side, left:left + side] = True
            ys, xs = mask.nonzero(as_tuple=True)
            boxes.append([left + xs.min().item(), top + ys.min().item(), left + xs.max().item() + 1,
                          top + ys.max().item() + 1])
            labels.append(int(classes[k]) + 1)
        canvases.append(canvas.expand(3, size, size).clone())
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    return canvases, targets


@torch.no_grad()
def recall_at_half(model, images, targets, score: float = 0.2) -> float:
    """Percent of true boxes matched (IoU >= 0.5, same class) by a detection scoring >= ``score``."""
    model.eval()
    found = total = 0
    for i in range(0, len(images), 16):
        for det, tgt in zip(model(images[i:i + 16]), targets[i:i + 16]):
            keep = det["scores"] >= score
            total += len(tgt["boxes"])
            if keep.any() and len(tgt["boxes"]):
                iou = torchvision.ops.box_iou(tgt["boxes"], det["boxes"][keep])
                same = tgt["labels"][:, None] == det["labels"][keep][None, :]
                found += int(((iou >= 0.5) & same).any(1).sum())
    return 100 * found / max(total, 1)


def mean_ap_50(model, images, targets) -> float:
    """COCO-style mAP at IoU 0.5 (percent), by torchmetrics' ``MeanAveragePrecision`` (pycocotools).

    Raises:
        ImportError: naming the install command when torchmetrics or pycocotools is missing.
    """
    try:
        from torchmetrics.detection import MeanAveragePrecision
        import pycocotools  # noqa: F401  (torchmetrics' default backend)
    except ImportError as e:
        raise ImportError(f"mAP needs torchmetrics and pycocotools ({e.name} is missing): "
                          "pip install torchmetrics pycocotools") from None
    metric = MeanAveragePrecision(iou_thresholds=[0.5])  # COCO's rule: the 100 best detections per image
    metric.warn_on_many_detections = False
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), 16):
            metric.update(model(images[i:i + 16]), targets[i:i + 16])
    return 100 * float(metric.compute()["map_50"])


def train(model, images, targets, epochs: int, batch: int = 16, lr: float = 0.05, log=print) -> float:
    """torchvision's reference loop (SGD, one-cycle LR; order from torch's global RNG); returns seconds."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    steps = epochs * (len(images) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images)).tolist()
        # a bar inside the epoch on a terminal (tqdm turns itself off when output is not one)
        for i in tqdm(range(0, len(order) - batch + 1, batch), desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                      disable=None):
            idx = order[i:i + batch]
            loss_dict = model([images[j] for j in idx], [targets[j] for j in idx])
            losses = sum(loss for loss in loss_dict.values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()
        per_scale = getattr(loss_dict, "per_scale", {})  # the SCT dict's losses at each scale
        per_scale = {s: round(sum(v.values()).item(), 3) for s, v in per_scale.items()}
        log(f"epoch {epoch + 1}/{epochs}: loss {losses.item():.3f}" + (f", per scale {per_scale}" if per_scale else ""))
    return time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small run (69 s on 2 idle CPU cores)")
    p.add_argument("--scales", default="192,128", help="transform sizes (fixed_size) to train, largest first")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--canvases", type=int, default=3000)
    p.add_argument("--out", default="runs/detection_sct", help="where to write the per-scale checkpoints")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.canvases = 2, 400
    torch.manual_seed(0)
    scales = [int(s) for s in args.scales.split(",")]
    images, targets = make_canvases(args.canvases, "train", seed=0)
    test_images, test_targets = make_canvases(100 if args.quick else 500, "test", seed=1)
    print(f"{len(images)} training canvases, {len(test_images)} test canvases (128x128)")

    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=11)
    model = sct.convert(model, scales=scales)              # the SCT change
    seconds = train(model, images, targets, args.epochs)   # torchvision's reference loop
    print(f"trained in {seconds:.0f} s")
    for s in scales:
        with sct.scale(model, s):                            # branch s, images resized to s
            line = f"  at {s}x{s}: recall@0.5 {recall_at_half(model, test_images, test_targets):.1f}%"
            try:
                line += f", mAP@0.5 {mean_ap_50(model, test_images, test_targets):.1f}%"
            except ImportError as e:
                line += f" (no mAP: {e})"
            print(line)
    paths = sct.save_per_scale(model, args.out, arch="ssdlite")
    print("wrote", ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
