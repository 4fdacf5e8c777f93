"""DDP on CPU with gloo, 2 ranks: the drop-in loop and train_step keep ranks identical."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def _worker(rank, world, init, out, mode, backend="gloo"):
    import timm
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sct_convert as sct

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = sct.convert(timm.create_model("test_resnet", num_classes=4), [64, 32])
    if backend == "nccl":  # the GPU recipe: SyncBN reaches every branch, one device per rank
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
    # DDP's defaults (broadcast_buffers=True); train_step leaves other branches unused per scale
    ddp = DDP(model, device_ids=[rank] if backend == "nccl" else None,
              find_unused_parameters=(mode == "train_step"))
    crit = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(2):
        x, y = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 4, (4,), generator=g)
        x, y = x.to(device), y.to(device)
        if mode == "drop_in":
            opt.zero_grad()
            crit(ddp(x), y).backward()
            opt.step()
        else:
            sct.train_step(ddp, x, y, crit, opt)
    ddp.eval()
    ddp(torch.randn(1, 3, 64, 64, device=device))  # DDP broadcasts buffers from rank 0 at a forward's start
    torch.save({k: v.cpu().clone() for k, v in model.state_dict().items()}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["drop_in", "train_step"])
@pytest.mark.slow
def test_two_rank_ddp_keeps_ranks_identical(tmp_path, mode):
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path), mode), nprocs=2)
    a, b = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert differing == []
    fresh = __import__("timm").create_model("test_resnet", num_classes=4).state_dict()
    # training moved both branches, and every branch's buffers agree across ranks
    assert not torch.equal(a["layer1.0.bn1.branches.32.running_mean"], fresh["layer1.0.bn1.running_mean"])


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="needs CUDA GPUs and NCCL (CI has neither)")
@pytest.mark.parametrize("mode", ["drop_in", "train_step"])
def test_nccl_ddp_with_sync_batchnorm_on_gpus(tmp_path, mode):
    world = min(2, torch.cuda.device_count())  # NCCL needs one GPU per rank
    mp.spawn(_worker, args=(world, f"file://{tmp_path}/init", str(tmp_path), mode, "nccl"), nprocs=world)
    states = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    assert all(not any(not torch.equal(s[k], states[0][k]) for k in s) for s in states)
    assert any(".branches.32." in k for k in states[0])


def _calibrate_worker(rank, world, init, out):
    import sct_convert as sct
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = sct.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), [32, 16])
    g = torch.Generator().manual_seed(10 + rank)
    shard = [torch.randn(4, 3, 32, 32, generator=g) + rank for _ in range(2)]  # ranks differ
    sct.calibrate(model, shard, num_batches=2, progress=False)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, f"c{rank}.pt"))
    # what this rank alone would have measured
    alone = sct.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), [32, 16])
    alone.load_state_dict(model.state_dict())
    dist.destroy_process_group()
    sct.calibrate(alone, shard, num_batches=2, progress=False)
    torch.save({k: v.clone() for k, v in alone.state_dict().items()}, os.path.join(out, f"a{rank}.pt"))


def test_calibrate_under_ddp_averages_statistics_across_ranks(tmp_path):
    mp.spawn(_calibrate_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    c0, c1 = torch.load(tmp_path / "c0.pt"), torch.load(tmp_path / "c1.pt")
    a0, a1 = torch.load(tmp_path / "a0.pt"), torch.load(tmp_path / "a1.pt")
    for key in ("1.branches.32.running_mean", "1.branches.16.running_var"):
        assert torch.equal(c0[key], c1[key])
        assert torch.allclose(c0[key], (a0[key] + a1[key]) / 2, atol=1e-5)
        assert not torch.allclose(a0[key], a1[key])
