"""A DDP (gloo) SCT run that checkpoints every step and resumes from the last checkpoint when
torchrun restarts it. With --kill-at K, rank 1 kills itself (SIGKILL, as a preempted node
dies) at step K of the first attempt; torchrun --max-restarts 1 restarts every rank.

    torchrun --nproc_per_node 2 --max-restarts 1 tests/torchrun_resume.py --dir D [--kill-at 3]
"""
import argparse
import os
import signal
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import sct_convert as sct

STEPS = 6


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--kill-at", type=int, default=-1)
    args = p.parse_args()
    out = Path(args.dir)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # a store namespace per attempt: the restarted ranks would otherwise meet the dead attempt's
    # addresses in torchrun's store (gloo then connects to a port nobody listens on)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = sct.convert(timm.create_model("test_resnet", num_classes=3), [32, 24, 16])
    sct.set_sampling(model, between=True)  # sampling settings are code, not checkpoint: set them again
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    start = 0
    if (out / "state.pt").exists():  # what a user saves: weights, optimizer, scheduler, step, RNG
        sct.load(out / "model.safetensors", model=model)
        state = torch.load(out / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(torch.load(out / f"rng{rank}.pt", weights_only=True))
        start = state["step"]
    ddp = DDP(model, find_unused_parameters=True)  # a subset of scales leaves the other branches unused
    criterion = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    ddp.train()
    for step in range(start, STEPS):
        if step == args.kill_at and rank == 1 and attempt == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(rank, step)
        with sct.sampling_scales(model, sct.random_scale_subset(model, 2, step)):
            loss = criterion(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        torch.save(torch.get_rng_state(), out / f"rng{rank}.pt")
        if rank == 0:  # written before the barrier, so a rank that dies after it finds it whole
            sct.save(model, out / "model.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": step + 1}, out / "state.tmp")
            os.replace(out / "state.tmp", out / "state.pt")
        dist.barrier()
    if rank == 0:
        sct.save(model, out / "final.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
