"""A long SCT run that dies resumes where it stopped: in-process from what a user saves, timm's
own train.py --resume, and a torchrun restart after a rank is killed (docs/training.md says
what to save)."""
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import sct_convert as sct

TESTS = Path(__file__).resolve().parent
STEPS, STOP = 6, 3


def _build():
    torch.manual_seed(0)
    model = sct.convert(timm.create_model("test_resnet", num_classes=3, drop_rate=0.3), [32, 24, 16],
                        unknown_scale="interpolate")
    sct.set_sampling(model, between=True)  # a random in-between size per step, from torch's RNG
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _steps(model, optimizer, scheduler, start, stop):
    criterion = sct.SCTLoss(torch.nn.CrossEntropyLoss())
    model.train()
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
        with sct.sampling_scales(model, sct.random_scale_subset(model, 2, step)):
            loss = criterion(model(x), y)  # dropout and the in-between size draw from torch's RNG
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _run_until(stop):
    """A fresh run from the same seed, trained up to ``stop``."""
    model, optimizer, scheduler = _build()
    torch.manual_seed(1234)
    _steps(model, optimizer, scheduler, 0, stop)
    return model, optimizer, scheduler


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    want = _run_until(STEPS)[0].state_dict()
    model, optimizer, scheduler = _run_until(STOP)
    sct.save(model, tmp_path / "model.safetensors")  # what to save, as docs/training.md lists it
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": STOP,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp_path / "state.pt")
    del model, optimizer, scheduler
    torch.manual_seed(999)  # a new process would start from another RNG state

    # the model built as the run built it (the file records no drop_rate nor sampling settings),
    # then the weights loaded into it
    model, optimizer, scheduler = _build()
    sct.load(tmp_path / "model.safetensors", model=model)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    _steps(model, optimizer, scheduler, state["step"], STEPS)
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_without_the_rng_state_the_resumed_run_differs(tmp_path):
    """The check above can fail: skip one item of the list and the weights differ."""
    want = _run_until(STEPS)[0].state_dict()
    model, optimizer, scheduler = _run_until(STOP)
    torch.manual_seed(999)  # RNG state not restored
    _steps(model, optimizer, scheduler, STOP, STEPS)
    assert any(not torch.equal(model.state_dict()[k], want[k]) for k in want)


def _image_folder(root: Path) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.slow
def test_timm_train_py_resumes_a_converted_model(tmp_path):
    data = _image_folder(tmp_path / "data")
    args = [sys.executable, str(TESTS / "run_timm_train.py"), "--sct-scales", "32,24", "--data-dir", str(data),
            "--model", "test_resnet", "--num-classes", "2", "--img-size", "32", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--output", str(tmp_path / "out"), "--experiment", "run", "--lr", "0.01",
            "--warmup-epochs", "0", "--sched", "cosine", "--checkpoint-hist", "3"]
    first = subprocess.run(args + ["--epochs", "2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    last = tmp_path / "out" / "run" / "last.pth.tar"
    before = torch.load(last, weights_only=False)
    assert before["epoch"] == 1 and any(".branches.24." in k for k in before["state_dict"])
    shutil.copy(last, tmp_path / "interrupted.pth.tar")
    resumed = subprocess.run(args + ["--epochs", "3", "--resume", str(tmp_path / "interrupted.pth.tar")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in log and "(epoch 1)" in log and "Train: 2 " in log and "Train: 0 " not in log
    after = torch.load(last, weights_only=False)
    assert after["epoch"] == 2
    changed = [k for k, v in before["state_dict"].items() if not torch.equal(v, after["state_dict"][k])]
    assert any(".branches.32." in k for k in changed) and any(".branches.24." in k for k in changed)
    summary = (tmp_path / "out" / "run" / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary if not line.startswith("epoch")] == ["0", "1", "2"]


@pytest.mark.slow
def test_a_torchrun_rank_killed_mid_run_restarts_and_ends_with_the_undisturbed_weights(tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        out.mkdir()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts",
                            "1", "--standalone", str(TESTS / "torchrun_resume.py"), "--dir", str(out), *extra],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return r, load_file(out / "final.safetensors")

    _, undisturbed = run("undisturbed")
    killed, restarted = run("killed", "--kill-at", "3")
    assert "exitcode: -9" in killed.stderr  # rank 1 really died, and torchrun restarted the job
    assert undisturbed.keys() == restarted.keys()
    assert [k for k in undisturbed if not torch.equal(undisturbed[k], restarted[k])] == []
