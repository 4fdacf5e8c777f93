"""SCT under DDP, launched with torchrun. CPU (gloo) works anywhere; GPUs use NCCL.

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py                   # CPU, gloo
    torchrun --nproc_per_node=8 examples/ddp_torchrun.py --backend nccl    # one GPU per rank
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --lean            # sct.train_step

Rules that keep ranks in step:
- Drop-in loop: one DDP forward per step (it runs every scale inside), DDP defaults work
  (broadcast_buffers=True syncs every branch's running statistics from rank 0).
- sct.train_step: wrap with find_unused_parameters=True (each scale leaves the other
  branches unused); it runs all but the last scale under no_sync, so one all-reduce per step.
- A per-step subset of scales must be the same on every rank: draw it with
  sct.random_scale_subset(model, k, step) (seeded by the step), never with per-rank RNG.
- SyncBatchNorm: nn.SyncBatchNorm.convert_sync_batchnorm(model) after sct.convert reaches
  every branch; then every rank must run the same scales in the same order (it does, above).
"""
import argparse
import os

import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import sct_convert as sct


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per rank)")
    p.add_argument("--steps", type=int, default=5, help="training steps (default 5, under a minute on CPU)")
    p.add_argument("--lean", action="store_true", help="use sct.train_step (one scale at a time)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (GPUs only)")
    args = p.parse_args()
    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # same init on every rank (DDP also broadcasts it)

    model = sct.convert(timm.create_model("resnet18", num_classes=10), scales=[128, 96, 64])  # SCT (1/2)
    if args.sync_bn:
        if not torch.cuda.is_available():
            raise SystemExit("--sync-bn needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU "
                             "(drop --sync-bn; each rank then keeps its own batch statistics)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = DDP(model.to(device), device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=args.lean)
    criterion = sct.SCTLoss(torch.nn.CrossEntropyLoss())                                        # SCT (2/2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(rank)  # each rank its own data shard
    for step in range(args.steps):
        x = torch.randn(8, 3, 128, 128, generator=g).to(device)
        y = torch.randint(0, 10, (8,), generator=g).to(device)
        if args.lean:
            loss = sct.train_step(model, x, y, criterion, optimizer).loss
        else:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
