"""Train the Fashion-MNIST ResNet-20 models that ``benchmarks/int8.py`` quantizes.

SCT at {32, 16} and at {32, 24, 16}, the drop-in loop of ``benchmarks/fmnist_sct.py`` (SGD
nesterov, one-cycle LR, flip + translate), one checkpoint per preset and seed, written with
``sct.save`` to ``--out`` (skipped when it is already there, so a stopped run resumes):

    python benchmarks/int8_train.py                                   # CPU: 10,000 images, 3 epochs, ~20 min
    python benchmarks/int8_train.py --limit 0 --epochs 15 --device cuda   # full set on a GPU
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import fashion_mnist  # noqa: E402
from cifar_resnet import CifarResNet  # noqa: E402

import sct_convert as sct  # noqa: E402

PRESETS = {"32,16": [32, 16], "32,24,16": [32, 24, 16]}


def checkpoint_name(preset: str, seed: int) -> str:
    return f"fmnist_resnet20_sct{preset.replace(',', '-')}_seed{seed}.safetensors"


def train(scales, seed, x_train, y_train, epochs, lr=0.1, batch_size=128, device="cpu"):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = sct.convert(CifarResNet(20, num_classes=10, in_chans=1).to(device), scales)
    criterion = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = len(x_train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps, pct_start=0.15)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=g).to(device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = criterion(model(fashion_mnist.augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=10000, help="train on the first N images (0: all 60,000)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="benchmarks/results/int8_models")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="sct_convert: input size")
    x_train, y_train = fashion_mnist.load("train", args.device)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for preset, scales in PRESETS.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            path = out / checkpoint_name(preset, seed)
            if path.exists():
                continue
            t0 = time.time()
            model = train(scales, seed, x_train, y_train, args.epochs, device=args.device)
            sct.save(model.cpu(), path)
            print(f"{path.name}: {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
