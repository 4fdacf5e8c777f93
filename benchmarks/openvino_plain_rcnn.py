"""torchvision's plain Faster R-CNN (no conversion), exported with the TorchScript-based ONNX exporter
and run in onnxruntime and OpenVINO on the same image: the two runtimes' detections differ for the
plain model too, as they do for a converted R-CNN's per-scale file (benchmarks/family_check.py).

    python benchmarks/openvino_plain_rcnn.py
"""
import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
import torchvision

warnings.filterwarnings("ignore")
PATH = os.path.join(tempfile.mkdtemp(), "plain_rcnn.onnx")
torch.manual_seed(0)
m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
x = torch.rand(3, 200, 260)
torch.onnx.export(m, ([x],), PATH, dynamo=False, opset_version=17, input_names=["images"],
                  dynamic_axes={"images": {1: "h", 2: "w"}})
s = ort.InferenceSession(PATH, providers=["CPUExecutionProvider"])
c = ov.Core().compile_model(PATH, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
want = s.run(None, {"images": x.numpy()})
got = [np.asarray(v) for v in c({"images": x.numpy()}).values()]
for name, w, g in zip(("boxes", "scores", "labels"), want, got):
    diff = float(np.abs(w - g).max() / max(1e-9, np.abs(w).max())) if w.shape == g.shape else "shapes differ"
    print(f"{name}: onnxruntime {w.shape}, OpenVINO {g.shape}, {diff}")
