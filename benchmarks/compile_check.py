"""torch.compile of a converted model: graphs compiled per number of scales, and a training step.

For each scale count M, converts the model at M scales, compiles it (``dynamic=True`` by
default, or ``--mark-dynamic`` to mark H and W dynamic on the input instead), runs every
trained scale once in eval mode and reports how many graphs dynamo compiled, graph breaks and
the largest difference from eager. The original model is compiled the same way and run at the
same sizes, so the table shows what conversion adds (a converted model routes in-graph from
the input's shape, so it should compile as often as the original). Then one drop-in training
step (sampling every scale) compiled against eager.

    python benchmarks/compile_check.py                              # CPU, inductor
    python benchmarks/compile_check.py --backend eager --counts 2,5,8,10
    python benchmarks/compile_check.py --device cuda --model resnet50
"""
from __future__ import annotations

import argparse
import copy
import warnings

import timm
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sct_convert as sct


def snapshot():
    return {"graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(counters["graph_break"].values())}


def break_reasons() -> dict:
    return {k.splitlines()[0]: v for k, v in counters["graph_break"].items()}


def scales_for(count: int, largest: int, step: int):
    return [largest - i * step for i in range(count)]


def serve(model, scales, args):
    """Compile ``model``, run each scale once (eval); return (graphs, breaks, max |diff| vs eager)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=args.backend, dynamic=None if args.mark_dynamic else True)
    worst = 0.0
    with torch.no_grad():
        for s in scales:
            x = torch.randn(args.batch, 3, s, s, device=args.device)
            if args.mark_dynamic:
                torch._dynamo.mark_dynamic(x, 2)
                torch._dynamo.mark_dynamic(x, 3)
            worst = max(worst, (compiled(x) - model(x)).abs().max().item())
    after = snapshot()
    return after["graphs"], after["breaks"], worst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--counts", default="1,2,5,8,10", help="numbers of scales to convert with")
    p.add_argument("--largest", type=int, default=224)
    p.add_argument("--step", type=int, default=16, help="scales are largest, largest-step, ...")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mark-dynamic", action="store_true", help="mark H, W dynamic instead of dynamic=True")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 64  # let recompiles show instead of falling back
    torch.manual_seed(0)
    original = timm.create_model(args.model, num_classes=10).to(args.device).eval()
    mode = "mark_dynamic(H, W)" if args.mark_dynamic else "dynamic=True"
    print(f"{args.model} device={args.device} backend={args.backend} {mode} batch={args.batch} "
          f"torch={torch.__version__}")
    print(f"{'scales':>6s} {'sizes':28s} {'orig graphs':>11s} {'conv graphs':>11s} {'conv breaks':>11s} "
          f"{'max |diff|':>10s}")
    for count in [int(c) for c in args.counts.split(",")]:
        scales = scales_for(count, args.largest, args.step)
        model = sct.convert(copy.deepcopy(original), scales).eval()
        orig_graphs, _, _ = serve(original, scales, args)
        graphs, breaks, worst = serve(model, scales, args)
        sizes = ",".join(map(str, scales))
        print(f"{count:6d} {sizes[:28]:28s} {orig_graphs:11d} {graphs:11d} {breaks:11d} {worst:10.2e}",
              flush=True)
        if breaks:  # per row, so a run stopped early still says why
            print("  graph break reasons:", break_reasons(), flush=True)

    scales = scales_for(3, args.largest, args.step)
    model = sct.convert(copy.deepcopy(original), scales).train()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=args.backend)
    crit = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    x = torch.randn(args.batch, 3, scales[0], scales[0], device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    loss_c = crit(compiled(x), y)
    loss_c.backward()
    loss_e = crit(eager(x), y)
    loss_e.backward()
    gdiff = max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), eager.parameters())
                if a.grad is not None)
    after = snapshot()
    print(f"train step at {scales} (sampling, {args.backend}): loss diff {abs(loss_c.item() - loss_e.item()):.2e}, "
          f"max grad diff {gdiff:.2e}, graphs {after['graphs']}, breaks {after['breaks']}")
    if counters["graph_break"]:
        print("graph break reasons:", break_reasons())


if __name__ == "__main__":
    main()
