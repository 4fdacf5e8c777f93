"""SCT for semantic segmentation: one encoder-decoder that segments at 64 and at 32 pixels.

The data is Fashion-MNIST as a dense task: canvases of 2-4 garments at random positions and
sizes, every garment pixel labelled with its class (1..10), background 0. The model is a user's
own encoder-decoder with torchvision's output convention (``{"out", "aux"}`` at the input's
size) and the loss is torchvision's segmentation reference recipe (``out`` + 0.5 ``aux``,
``ignore_index=255``). The SCT changes are the two marked lines; the label maps stay at the
canvas size and ``SCTLoss`` resizes them to each scale's output.

    python examples/segmentation_sct.py --quick      # 46 s on 2 idle CPU cores
    python examples/segmentation_sct.py --epochs 6 --canvases 6000 --out runs/seg
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402

import sct_convert as sct  # noqa: E402

NUM_CLASSES = 11  # background + the 10 garment classes
IGNORE_INDEX = 255


def make_canvases(n: int, split: str = "train", size: int = 64, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases (n, 1, size, size), normalised, and their label maps (n, size, size).

    Each canvas holds 2-4 garments, each resized to a random side between size/4 and size/2 and
    placed at a random position (later garments occlude earlier ones). A pixel is labelled with
    its garment's class + 1 where the garment's intensity exceeds 0.1, else background (0).
    """
    images, classes = fashion_mnist.load(split)
    raw = (images * fashion_mnist.STD + fashion_mnist.MEAN)[..., 2:30, 2:30]  # the 28x28 originals
    g = torch.Generator().manual_seed(seed)
    canvas = torch.zeros(n, 1, size, size)
    target = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            k = int(torch.randint(len(raw), (1,), generator=g))
            side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=g))
            top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
            piece = F.interpolate(raw[k:k + 1], size=(side, side), mode="bilinear", align_corners=False,
                                  antialias=True)[0, 0]
            mask = piece > 0.1
            window = (slice(top, top + side), slice(left, left + side))
            canvas[i, 0][window] = torch.where(mask, piece, canvas[i, 0][window])
            target[i][window] = torch.where(mask, classes[k] + 1, target[i][window])
    return (canvas - fashion_mnist.MEAN) / fashion_mnist.STD, target


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """A small encoder-decoder: stride-4 context (dilated convs), one skip at stride 2, and an
    auxiliary head on the context features; outputs upsampled to the input, as torchvision's."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_chans: int = 1, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_chans, width // 2, 2), conv_bn(width // 2, width))
        self.context = nn.Sequential(conv_bn(width, width * 3 // 2, 2), conv_bn(width * 3 // 2, width * 3 // 2, 1, 2),
                                     conv_bn(width * 3 // 2, width * 3 // 2, 1, 4))
        self.fuse = nn.Sequential(nn.Conv2d(width * 5 // 2, width, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.aux_classifier = nn.Conv2d(width * 3 // 2, num_classes, 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        size = x.shape[-2:]
        skip = self.stem(x)
        ctx = self.context(skip)
        up = F.interpolate(ctx, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        out = self.classifier(self.fuse(torch.cat([up, skip], 1)))
        aux = self.aux_classifier(ctx)
        return {"out": F.interpolate(out, size=size, mode="bilinear", align_corners=False),
                "aux": F.interpolate(aux, size=size, mode="bilinear", align_corners=False)}


def criterion(inputs: Dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """torchvision's references/segmentation/train.py criterion."""
    losses = {name: F.cross_entropy(x, target, ignore_index=IGNORE_INDEX) for name, x in inputs.items()}
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


@torch.no_grad()
def mean_iou(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, batch: int = 256) -> float:
    """mIoU (percent, over the classes present) of the model run at ``size``, scored at the label's size."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in range(0, len(x), batch):
        xs = fashion_mnist.resize(x[i:i + batch], size)
        out = model(xs)["out"]
        pred = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        t = y[i:i + batch]
        keep = t != IGNORE_INDEX
        confusion += torch.bincount(t[keep] * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES ** 2).view(
            NUM_CLASSES, NUM_CLASSES)
    inter = confusion.diag().float()
    union = confusion.sum(0).float() + confusion.sum(1).float() - inter
    present = confusion.sum(1) > 0
    return float((inter[present] / union[present]).mean() * 100)


def train(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 32,
          lr: float = 0.1, seed: int = 0, log=print) -> float:
    """A plain training loop (SGD, cosine); returns the seconds it took."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = len(x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps, pct_start=0.1)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        # a bar inside the epoch on a terminal (tqdm turns itself off when output is not one)
        for i in tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = loss_fn(model(x[idx]), y[idx])  # unchanged: ScaleOutputs go to SCTLoss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        per_scale = getattr(loss_fn, "last_losses", {})
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}"
            + "".join(f"  @{s}: {v.item():.3f}" for s, v in per_scale.items()))
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small run (46 s on 2 idle CPU cores)")
    p.add_argument("--scales", default="64,32", help="training scales, largest first")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--canvases", type=int, default=4000, help="training canvases")
    p.add_argument("--out", default="runs/segmentation_sct", help="where to write the per-scale checkpoints")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.canvases = 4, 2500
    torch.manual_seed(0)
    scales = [int(s) for s in args.scales.split(",")]
    x, y = make_canvases(args.canvases, "train", size=scales[0], seed=0)
    x_test, y_test = make_canvases(300 if args.quick else 1000, "test", size=scales[0], seed=1)
    print(f"{len(x)} training canvases {tuple(x.shape[-2:])}, {len(x_test)} test canvases")

    model = sct.convert(SegNet(), scales=scales)       # SCT change 1 of 2
    loss_fn = sct.SCTLoss(criterion)                   # SCT change 2 of 2
    seconds = train(model, loss_fn, x, y, args.epochs, lr=args.lr)
    print(f"trained in {seconds:.0f} s")

    sizes = sorted({*scales, *range(min(scales), max(scales) + 1, 8)}, reverse=True)
    warnings.filterwarnings("ignore", message="sct_convert: input size")  # the branch is printed below
    for size in sizes:
        branch = sct.route(model, (size, size))  # the branch a call at this size runs
        print(f"  at {size}x{size}: branch {branch}, mIoU {mean_iou(model, x_test, y_test, size):.1f}%")
    paths = sct.save_per_scale(model, args.out, arch="segnet")
    print("wrote", ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
