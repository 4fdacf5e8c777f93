"""onnxruntime latency of a converted detector's per-scale ONNX files: is the smaller scale faster?

For each detector: convert at two transform sizes, calibrate each branch on a few structured
images (a random-init detector otherwise scores every box alike), write one per-scale ONNX file
per scale with ``sct.export_onnx(model, path, scale=s)`` (checked in onnxruntime against
``sct.extract`` before it is written), then time both files on the same image, interleaved, one
onnxruntime thread, and print the median of the repeats and the ratio small / large.

With ``--part core``: one switchable core file (``sct.export_onnx(model, path, part="core")``)
against each scale's per-scale core file, on the same pre-processed batch at that scale, timed
in turns: the cost of the switch (the ``If`` chain, the shared weights) is the ratio.

    python benchmarks/detector_onnx_latency.py
    python benchmarks/detector_onnx_latency.py --models ssdlite320_mobilenet_v3_large --repeats 50
    python benchmarks/detector_onnx_latency.py --part core
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sct_convert as sct  # noqa: E402
from sct_convert.deploy.api import read_deploy_metadata  # noqa: E402

DEFAULT_MODELS = "ssdlite320_mobilenet_v3_large,fasterrcnn_mobilenet_v3_large_320_fpn,retinanet_resnet50_fpn"


def blobs(n, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 8, generator=g), size=hw, mode="bicubic")
    return (0.8 * smooth + 0.2 * torch.rand(n, 3, *hw, generator=g)).clamp(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--scales", default="320,256", help="two transform sizes, largest first")
    p.add_argument("--image", default="480x640", help="the image size fed to both files")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--part", choices=["model", "core"], default="model")
    args = p.parse_args()
    import onnxruntime as ort

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    scales = [int(s) for s in args.scales.split(",")]
    hw = tuple(int(v) for v in args.image.split("x"))
    image = blobs(1, hw, seed=1)[0].numpy()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {ort.__version__}; "
          f"one thread, image {hw[0]}x{hw[1]}, median of {args.repeats} interleaved runs")
    if args.part == "core":
        print(f"{'model':40s} {'scale':>5s} {'per-scale core ms':>17s} {'switchable ms':>13s} {'switch/per-scale':>16s}")
    else:
        print(f"{'model':40s} {'exporter':11s} " + " ".join(f"{s:>9d}ms" for s in scales) + "  small/large  file MB")
    for name in args.models.split(","):
        torch.manual_seed(0)
        build = getattr(torchvision.models.detection, name)
        model = sct.convert(build(weights=None, weights_backbone=None, num_classes=3), scales).eval()
        sct.calibrate(model, [blobs(4, (300, 400))], num_batches=1, progress=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if args.part == "core":
            core_rows(model, name, scales, torch.from_numpy(image), options, args.repeats)
            continue
        with tempfile.TemporaryDirectory() as d:
            paths = [sct.export_onnx(model, os.path.join(d, f"{name}_{s}.onnx"), s) for s in scales]
            sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in paths]
            exporter = read_deploy_metadata(paths[0])["exporter"]
            size_mb = os.path.getsize(paths[0]) / 2**20
        times = [[] for _ in scales]
        for session in sessions:  # warm-up
            session.run(None, {"images": image})
        for r in range(args.repeats):
            for i in (range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))):
                start = time.perf_counter()
                sessions[i].run(None, {"images": image})
                times[i].append(time.perf_counter() - start)
        medians = [statistics.median(t) * 1000 for t in times]
        print(f"{name:40s} {exporter:11s} " + " ".join(f"{m:11.1f}" for m in medians)
              + f"  {medians[-1] / medians[0]:11.3f}  {size_mb:7.1f}", flush=True)


def interleaved(calls, repeats):
    """Median seconds of each call, timed in turns (the order reversed every other round)."""
    for call in calls:  # warm-up
        call()
    times = [[] for _ in calls]
    for r in range(repeats):
        for i in (range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))):
            start = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def core_rows(model, name, scales, image, options, repeats):
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        switchable = ort.InferenceSession(str(sct.export_onnx(model, os.path.join(d, "core.onnx"), part="core")),
                                          options, providers=["CPUExecutionProvider"])
        per_scale = [ort.InferenceSession(str(sct.export_onnx(model, os.path.join(d, f"core_{s}.onnx"), s,
                                                              part="core")),
                                          options, providers=["CPUExecutionProvider"]) for s in scales]
    for s, session in zip(scales, per_scale):
        batch = sct.detector_preprocess(model, [image], s)
        one, both = batch.feeds(switchable=False), batch.feeds()
        plain_s, switch_s = interleaved([functools.partial(session.run, None, one),
                                         functools.partial(switchable.run, None, both)], repeats)
        print(f"{name:40s} {s:5d} {plain_s * 1000:17.1f} {switch_s * 1000:13.1f} {switch_s / plain_s:16.3f}",
              flush=True)


if __name__ == "__main__":
    main()
