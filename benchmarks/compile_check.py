"""torch.compile of a converted model: eval at each scale and a drop-in training step.

Checks the compiled outputs against eager and reports, per scale, how many graphs dynamo
compiled, graph breaks and recompiles (a new input size recompiles once: that is the
guard on the input shape, as for the original model).

    python benchmarks/compile_check.py                       # CPU, inductor
    python benchmarks/compile_check.py --device cuda --model resnet50
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sct_convert as sct


def snapshot():
    return {"graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(counters["graph_break"].values()),
            "frames": counters["frames"]["ok"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--scales", default="128,96,64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="inductor")
    args = p.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    torch.manual_seed(0)
    original = timm.create_model(args.model, num_classes=10)
    model = sct.convert(copy.deepcopy(original), scales).to(args.device).eval()
    compiled = torch.compile(model, backend=args.backend)
    print(f"{args.model} scales={scales} device={args.device} backend={args.backend} torch={torch.__version__}")
    print(f"{'phase':22s} {'max |diff|':>11s} {'new graphs':>10s} {'breaks':>7s}")
    for s in scales + [scales[0]]:
        x = torch.randn(4, 3, s, s, device=args.device)
        before = snapshot()
        with torch.no_grad():
            diff = (compiled(x) - model(x)).abs().max().item()
        after = snapshot()
        print(f"{'eval @' + str(s):22s} {diff:11.2e} {after['graphs'] - before['graphs']:10d} "
              f"{after['breaks'] - before['breaks']:7d}")
    model.train()
    eager = copy.deepcopy(model)
    crit = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    x = torch.randn(4, 3, scales[0], scales[0], device=args.device)
    y = torch.randint(0, 10, (4,), device=args.device)
    before = snapshot()
    loss_c = crit(compiled(x), y)
    loss_c.backward()
    after = snapshot()
    loss_e = crit(eager(x), y)
    loss_e.backward()
    gdiff = max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), eager.parameters())
                if a.grad is not None)
    print(f"{'train step (all scales)':22s} {abs(loss_c.item() - loss_e.item()):11.2e} "
          f"{after['graphs'] - before['graphs']:10d} {after['breaks'] - before['breaks']:7d}"
          f"   max grad diff {gdiff:.2e}")
    if counters["graph_break"]:
        print("graph break reasons:", dict(counters["graph_break"]))


if __name__ == "__main__":
    main()
