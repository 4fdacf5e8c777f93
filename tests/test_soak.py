"""The soak benchmark's short version: every serving path (eager, a shared switchable ONNX
session, per-scale sessions, the torch-free cascade runtime) under 8 client threads answers
every request exactly as when served alone."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_path_answers_every_request_right_under_load():
    pytest.importorskip("onnxruntime")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| path")]
    assert [row.split("|")[1].strip() for row in rows] == ["eager", "onnx", "per-scale", "cascade"]
    assert all(row.split("|")[-2].strip() == "0" for row in rows)  # wrong answers per path
    assert "every answer right" in r.stdout
