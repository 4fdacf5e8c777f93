"""The README's promises to a newcomer: the quickstart runs as pasted, every guide and example
it names exists, and each example answers --help."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quickstart() -> str:
    section = README.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_as_pasted_and_says_what_it_did(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _quickstart()
    assert len(code.strip().splitlines()) <= 32
    namespace: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), namespace)
    import sct_convert as sct

    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[:2]] == ["step 0", "step 1"]
    assert "per scale {128: " in printed[0] and ", 64: " in printed[0]
    assert printed[2:5] == ["a 128x128 image runs branch 128", "a 112x112 image runs branch 96",
                            "a 64x64 image runs branch 64"]  # 112 is nearer 96 than 128 in pixels
    assert printed[5] == "wrote resnet18_sct.safetensors, resnet18_64.safetensors, resnet18_sct.pt2"

    assert namespace["fast"].shape == namespace["best"].shape == (1, 10)
    reloaded = sct.load(tmp_path / "resnet18_sct.safetensors")
    assert sct.scales_of(reloaded) == (128, 96, 64)
    assert (tmp_path / "resnet18_64.safetensors").is_file() and (tmp_path / "resnet18_sct.pt2").is_file()


def test_every_linked_file_and_named_example_exists():
    targets = re.findall(r"\]\(((?:docs|examples)/[^)#]+)", README)
    targets += re.findall(r"(examples/\w+\.py)", README)
    assert targets and not [t for t in targets if not (ROOT / t).exists()]
    for doc in (ROOT / "docs").glob("*.md"):  # links between the guides (mkdocs --strict checks them too)
        for link in re.findall(r"\]\(([\w./-]+\.(?:md|png|txt|csv))", doc.read_text()):
            # figures/*.png are docs/figures/ or, published by docs/hooks.py, benchmarks/results/
            found = (doc.parent / link).exists() or (
                link.startswith("figures/") and (ROOT / "benchmarks" / "results" / link[len("figures/"):]).exists())
            assert found, f"{doc.name} links to missing {link}"


@pytest.mark.parametrize("example", ["train_fashion_mnist.py", "ddp_torchrun.py", "lightning_sct.py",
                                     "segmentation_sct.py", "detection_sct.py"])
def test_examples_answer_help(example):
    if example == "lightning_sct.py":
        pytest.importorskip("lightning")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--" in out.stdout


def test_ddp_example_refuses_sync_bn_on_cpu_in_one_line(tmp_path):
    import socket

    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only hosts")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "ddp_torchrun.py"), "--sync-bn", "--steps", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--sync-bn needs CUDA GPUs" in out.stderr
