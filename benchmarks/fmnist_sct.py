"""Fashion-MNIST (padded to 32x32): CIFAR-style ResNet trained plainly at 32 vs SCT at {32, 16}.

Both arms use the same net, epochs, schedule (SGD momentum 0.9, wd 5e-4, one-cycle LR, batch
128) and seeds; the SCT arm goes through the drop-in loop (convert + SCTLoss). Reports test
accuracy at 32, 28, 24, 20, 16 (bilinear, antialiased resize of the test images).

    python benchmarks/fmnist_sct.py --device cuda --epochs 15 --seeds 0,1,2
    python benchmarks/fmnist_sct.py --epochs 2 --seeds 0             # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import fashion_mnist  # noqa: E402
from cifar_resnet import CifarResNet  # noqa: E402

import sct_convert as sct  # noqa: E402

TEST_SIZES = [32, 28, 24, 20, 16]
ARMS = {"plain@32": [32], "sct@32,16": [32, 16]}


def train_arm(scales, args, seed, data):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = CifarResNet(args.depth, num_classes=10, in_chans=1).to(args.device)
    criterion = torch.nn.CrossEntropyLoss()
    if len(scales) > 1:
        model = sct.convert(model, scales)
        criterion = sct.SCTLoss(criterion)
    elif scales[0] != 32:
        x_train = fashion_mnist.resize(x_train, scales[0])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = len(x_train) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.15)
    t0 = time.time()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=g).to(args.device)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = criterion(model(fashion_mnist.augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.time() - t0
    return model, evaluate(model, x_test, y_test, TEST_SIZES), train_s


def evaluate(model, x_test, y_test, sizes):
    """Top-1 accuracy (%) at each test size (bilinear, antialiased resize)."""
    model.eval()
    acc = {}
    with torch.no_grad():
        for size in sizes:
            x = fashion_mnist.resize(x_test, size)
            correct = sum((model(x[i:i + 2000]).argmax(1) == y_test[i:i + 2000]).sum().item()
                          for i in range(0, len(x), 2000))
            acc[size] = 100.0 * correct / len(x)
    return acc


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke runs)")
    p.add_argument("--out", default="benchmarks/results/fmnist_resnet20_sct.json")
    args = p.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="sct_convert: input size")
    x_train, y_train = fashion_mnist.load("train", args.device)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    data = (x_train, y_train, *fashion_mnist.load("test", args.device))
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for arm, scales in ARMS.items():
        runs = []
        for seed in seeds:
            _, acc, secs = train_arm(scales, args, seed, data)
            runs.append({"seed": seed, "acc": acc, "train_seconds": round(secs, 1)})
            print(f"{arm:10s} seed {seed}: " + " ".join(f"{s}:{acc[s]:.2f}" for s in TEST_SIZES)
                  + f"  ({secs:.0f}s)", flush=True)
        mean = {s: statistics.mean(r["acc"][s] for r in runs) for s in TEST_SIZES}
        spread = {s: (statistics.stdev(r["acc"][s] for r in runs) if len(runs) > 1 else 0.0) for s in TEST_SIZES}
        results[arm] = {"scales": scales, "runs": runs, "mean": mean, "std": spread}
    print(f"\nResNet-{args.depth} on Fashion-MNIST, {args.epochs} epochs, seeds {seeds}, device {args.device}")
    print(f"{'arm':10s} " + " ".join(f"{s:>12d}" for s in TEST_SIZES))
    for arm, r in results.items():
        print(f"{arm:10s} " + " ".join(f"{r['mean'][s]:6.2f}±{r['std'][s]:4.2f}" for s in TEST_SIZES))
    gap16 = results["sct@32,16"]["mean"][16] - results["plain@32"]["mean"][16]
    gap32 = results["sct@32,16"]["mean"][32] - results["plain@32"]["mean"][32]
    print(f"SCT - plain: {gap16:+.2f} points at 16, {gap32:+.2f} points at 32")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "settings": {**vars(args), "optimizer": "SGD nesterov momentum 0.9 wd 5e-4, one-cycle LR",
                     "augment": "flip + 4px translate", "device_name": device_name,
                     "torch": torch.__version__},
        "seeds": seeds, "arms": results, "sct_minus_plain": {"16": gap16, "32": gap32},
    }, indent=1))


if __name__ == "__main__":
    main()
