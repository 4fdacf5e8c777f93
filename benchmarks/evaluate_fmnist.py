"""Know the gain before you train: ``sct-convert evaluate`` on a model trained at one size.

A timm ``resnet10t`` (one input channel) is trained 2 epochs at 32 px on Fashion-MNIST, with the
same preprocessing ``evaluate`` applies at 32 (timm's eval transform: bicubic resize, crop_pct 1,
mean 0.2860, std 0.3530), and saved as a plain checkpoint. The test split is written as an
ImageFolder of PNGs (one folder per class). Then the command a user would run:

    sct-convert evaluate resnet10t --in-chans 1 --num-classes 10 --checkpoint CKPT \\
        --images FOLDER --scales 32,24,16 --mean 0.2860 --std 0.3530 --crop-pct 1.0 \\
        --out benchmarks/results/evaluate_fmnist.csv --plot benchmarks/results/evaluate_fmnist.png

scores the plain model and the model converted and calibrated per scale on 1,000 held-out test
images (disjoint from the 9,000 scored), no training. The table it prints also goes to ``.md``.

    python benchmarks/evaluate_fmnist.py          # ~6 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
import fashion_mnist  # noqa: E402

MEAN, STD = fashion_mnist.MEAN, fashion_mnist.STD


def raw(split: str):
    """The 28x28 uint8 images and labels of a split."""
    root = fashion_mnist.find_dir()
    prefix = "train" if split == "train" else "t10k"
    images = fashion_mnist._idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = fashion_mnist._idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def write_folder(images, labels, root: Path) -> None:
    from PIL import Image

    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / str(int(label)) / f"{i:05d}.png")


def preprocessed(images, size: int) -> torch.Tensor:
    """What evaluate feeds at ``size``: timm's eval transform (bicubic, crop_pct 1, normalise)."""
    import timm.data
    from PIL import Image

    transform = timm.data.create_transform(input_size=(1, size, size), interpolation="bicubic", mean=(MEAN,),
                                           std=(STD,), crop_pct=1.0, is_training=False)
    return torch.stack([transform(Image.fromarray(image)) for image in images])


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", in_chans=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5, nesterov=True)
    batch = 128
    steps = len(x) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="runs/evaluate_fmnist", help="where the folder and checkpoint go")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "evaluate_fmnist.csv"))
    args = p.parse_args()
    work = Path(args.work_dir)
    folder, ckpt = work / "fmnist_test", work / "resnet10t_fmnist32.safetensors"
    if not ckpt.exists():
        t0 = time.time()
        images, labels = raw("train")
        model = train(preprocessed(images, 32), torch.from_numpy(labels.astype(np.int64)), args.epochs)
        import safetensors.torch

        work.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(model.state_dict(), str(ckpt))
        print(f"trained resnet10t at 32 px in {time.time() - t0:.0f} s; wrote {ckpt}", flush=True)
    if not folder.exists():
        images, labels = raw("test")
        write_folder(images, labels, folder)
    out = Path(args.out)
    command = ["sct-convert", "evaluate", "resnet10t", "--in-chans", "1", "--num-classes", "10", "--checkpoint",
               str(ckpt), "--images", str(folder), "--scales", "32,24,16", "--mean", str(MEAN), "--std", str(STD),
               "--crop-pct", "1.0", "--out", str(out), "--plot", str(out.with_suffix(".png"))]
    print("$ " + " ".join(command), flush=True)
    table = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(table)
    lines = [line for line in table.splitlines() if not line.startswith("wrote ")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")  # the table the command printed


if __name__ == "__main__":
    main()
