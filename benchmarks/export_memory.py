"""Peak memory of ONNX export: per-scale and switchable, each in a fresh process.

For each model (random init, converted at three scales), a child process builds and converts it,
records its resident memory and resets the kernel's peak (``/proc/self/clear_refs``), exports
one file and reports the peak resident memory since (``VmHWM``, Linux). The table gives the
model's weights, the memory before the export, the peak and the peak's excess over the memory
before, in multiples of the weights. Before the switchable
export streamed its branches, it held every scale's ONNX graph and the assembled one at once
(RegNetY-128GF, 2.6 GB of weights, was killed at 24 GB); now one scale's graph at a time.

    python benchmarks/export_memory.py                        # torchvision regnet_y_16gf, regnet_y_32gf
    python benchmarks/export_memory.py --models torchvision/resnet50,timm/resnet50 --scales 224,192,128
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, warnings
from pathlib import Path
import torch
import sct_convert as sct
from sct_convert.checkpoints.zoo import create_model

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
name, source, scales, kind, out = sys.argv[1:]
model, _ = create_model(name, source)
model = sct.convert(model.eval(), [int(s) for s in scales.split(",")]).eval()
weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to now: building and converting the model peaks too
before = status("VmRSS")
scale = None if kind == "switchable" else int(scales.split(",")[-1])
path = sct.export_onnx(model, out, scale=scale)
size = sum(p.stat().st_size for p in Path(out).parent.glob(Path(out).name + "*"))
peak = status("VmHWM")
print(json.dumps(dict(weights=weights, before=before, peak=peak, file=size)))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="torchvision/regnet_y_16gf,torchvision/regnet_y_32gf")
    p.add_argument("--scales", default="224,168,112")
    p.add_argument("--kinds", default="per_scale,switchable")
    args = p.parse_args()
    import sct_convert
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(sct_convert.__file__).resolve().parent).stdout.strip()
    print(f"sct_convert {commit} torch {torch.__version__} scales {args.scales}")
    gb = 2**30
    print(f"{'model':28s} {'kind':10s} {'weights GB':>10s} {'before GB':>9s} {'peak GB':>8s} "
          f"{'excess/weights':>14s} {'file GB':>8s}")
    for entry in args.models.split(","):
        source, name = entry.split("/", 1) if "/" in entry else ("timm", entry)
        for kind in args.kinds.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                done = subprocess.run([sys.executable, "-c", CHILD, name, source, args.scales, kind,
                                       str(Path(tmp) / "m.onnx")], capture_output=True, text=True)
            if done.returncode:
                reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                print(f"{entry:28s} {kind:10s} failed: {reason[:120]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{entry:28s} {kind:10s} {r['weights'] / gb:10.2f} {r['before'] / gb:9.2f} {r['peak'] / gb:8.2f} "
                  f"{(r['peak'] - r['before']) / r['weights']:14.1f} {r['file'] / gb:8.2f}", flush=True)


if __name__ == "__main__":
    main()
