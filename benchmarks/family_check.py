"""One model per family (classifier, segmentation, video, detection): convert, train-mode forward,
routing, and every deployment file run in its runtime at every trained scale and one size between.

For each model: ``sct.convert``; a train-mode forward (sampling every scale); eval routing at every
scale equals ``sct.extract`` at that scale; a switchable ``torch.export`` program and a switchable
ONNX file, each run (``torch.export.load``, onnxruntime) at every scale and one in-between size
against the eager model. A file that cannot be written must be refused with no file left behind.

    python benchmarks/family_check.py            # ~3 min on 2 CPU cores
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
import traceback
import warnings

import numpy as np
import timm
import torch
import torchvision

import sct_convert as sct

warnings.simplefilter("ignore")


def models():
    tv = torchvision.models
    yield "classifier", "timm resnet18", timm.create_model("resnet18", num_classes=10), [96, 64], (1, 3)
    yield ("segmentation", "torchvision lraspp_mobilenet_v3_large",
           tv.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5),
           [96, 64], (1, 3))
    yield "video", "torchvision r3d_18", tv.video.r3d_18(weights=None, num_classes=4), [64, 48], (1, 3, 4)
    yield ("detection", "torchvision fasterrcnn_mobilenet_v3_large_320_fpn",
           tv.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                               num_classes=3), [320, 256], (1, 3))


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, (list, tuple)):
        return first_tensor(out[0])
    raise TypeError(type(out))


def rel(a, b) -> float:
    b = torch.as_tensor(b) if isinstance(b, np.ndarray) else first_tensor(b)
    a, b = first_tensor(a).float(), b.float()
    return float((a - b).abs().max() / (a.abs().max() + 1e-12))


def check(family, name, model, scales, lead) -> dict:
    row = {"family": family, "model": name}
    t0 = time.time()
    try:
        model = sct.convert(model, scales, example_input=torch.randn(*lead, scales[0], scales[0]))
        row["convert"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["convert"] = f"FAIL {type(e).__name__}: {str(e)[:120]}"
        return row
    between = (scales[0] + scales[1]) // 2
    sizes = list(scales) + [between]
    try:
        model.train()
        out = model(torch.randn(2, *lead[1:], scales[0], scales[0]))
        row["train forward"] = f"ok ({len(out)} scales)"
    except Exception as e:  # noqa: BLE001
        row["train forward"] = f"FAIL {type(e).__name__}: {str(e)[:100]}"
    model.eval()
    with torch.no_grad():
        errs = []
        for s in scales:
            x = torch.randn(*lead, s, s)
            errs.append(rel(model(x), sct.extract(model, s).eval()(x)))
        row["route == extract"] = f"max {max(errs):.1e}"
    with tempfile.TemporaryDirectory() as d:
        for fmt, write in (("pt2", sct.export_program), ("onnx", sct.export_onnx)):
            path = os.path.join(d, f"m.{fmt}")
            try:
                write(model, path, example_input=torch.randn(2, *lead[1:], scales[0], scales[0]))
            except Exception as e:  # noqa: BLE001
                left = sorted(os.listdir(d))
                row[fmt] = (f"refused ({type(e).__name__}: {str(e).splitlines()[0][:90]}); "
                            f"files left: {[f for f in left if f.startswith('m.' + fmt)] or 'none'}")
                continue
            if fmt == "pt2":
                run = torch.export.load(path).module()
                call = run
            else:
                import onnxruntime as ort

                session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                call = functools.partial(lambda sess, x: sess.run(None, {"images": x.numpy()})[0], session)
            errs = []
            try:
                with torch.no_grad():
                    for s in sizes:
                        x = torch.randn(2, *lead[1:], s, s)
                        out = call(x)
                        errs.append(rel(model(x), out if fmt == "pt2" else np.asarray(out)))
                row[fmt] = f"ok at {sizes}, max rel err {max(errs):.1e}"
            except Exception as e:  # noqa: BLE001
                row[fmt] = f"RUN FAIL at size {sizes[len(errs)]}: {type(e).__name__}: {str(e)[:100]}"
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")
    for family, name, model, scales, lead in models():
        try:
            row = check(family, name, model, scales, lead)
        except Exception:  # noqa: BLE001
            row = {"family": family, "model": name, "error": traceback.format_exc(limit=2)}
        print()
        for k, v in row.items():
            print(f"  {k:18s} {v}", flush=True)


if __name__ == "__main__":
    main()
