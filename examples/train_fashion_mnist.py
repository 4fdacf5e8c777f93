"""A plain PyTorch training loop on Fashion-MNIST, given SCT by two changed lines (marked).

    python examples/train_fashion_mnist.py --quick                       # 2,000 images, 19 s on 2 idle CPU cores
    python examples/train_fashion_mnist.py --epochs 3 --scales 32,16     # the full set: 60,000 images an epoch
    python examples/train_fashion_mnist.py --epochs 3 --scales 32        # plain training, to compare

Prints test accuracy at several input sizes; the SCT model serves them all. Needs Debian's
dataset-fashion-mnist package (apt-get install -y dataset-fashion-mnist); nothing is downloaded.
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import fashion_mnist  # noqa: E402
from cifar_resnet import resnet20  # noqa: E402

import sct_convert as sct  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="passes over the training images (default 3)")
    p.add_argument("--scales", default="32,16", help="training scales, comma-separated (default 32,16)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--train-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2,000 training and 2,000 test images, 1 epoch")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.train_images = 1, args.train_images or 2000
    torch.manual_seed(args.seed)
    scales = [int(s) for s in args.scales.split(",")]

    x_train, y_train = fashion_mnist.load("train", args.device)
    x_test, y_test = fashion_mnist.load("test", args.device)
    if args.train_images:
        x_train, y_train = x_train[:args.train_images], y_train[:args.train_images]
    if args.quick:
        x_test, y_test = x_test[:2000], y_test[:2000]
    model = resnet20(num_classes=10, in_chans=1).to(args.device)
    criterion = torch.nn.CrossEntropyLoss()

    model = sct.convert(model, scales=scales)          # SCT (1/2): one BN branch per scale
    criterion = sct.SCTLoss(criterion)                 # SCT (2/2): Eq. 1 over the scales

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * (len(x_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.15)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), device=args.device)
        for i in tqdm(range(len(x_train) // args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}"):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = fashion_mnist.augment(x_train[idx]), y_train[idx]
            loss = criterion(model(x), y)              # unchanged: the model samples the scales
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        for size in (32, 28, 24, 20, 16):
            x = fashion_mnist.resize(x_test, size)
            correct = sum((model(x[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item()
                          for i in range(0, len(x), 1000))
            print(f"test accuracy at {size}x{size}: {100 * correct / len(x):.2f}%")


if __name__ == "__main__":
    main()
