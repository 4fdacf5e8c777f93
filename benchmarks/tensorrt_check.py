"""TensorRT: do the per-scale float and int8 files build into engines that answer as onnxruntime?

For each scale of a converted timm model (random weights, BN statistics calibrated on random
images): the per-scale float file and the per-scale int8 file with symmetric Q/DQ (what
TensorRT's explicit quantization wants: ``sct.Int8(images, symmetric=True)``), each checked in
onnxruntime by the export. Then, on a GPU with TensorRT, each file is parsed and built (int8
engines with the INT8 flag: the Q/DQ nodes set every scale), run on the same inputs, and
compared with onnxruntime (float: max relative error; int8: top-1 agreement and relative error).

Without a GPU or without the ``tensorrt`` package the script stops just before the engine build
and says so: that is the CPU dry run (``--dry-run`` forces it).

    python benchmarks/tensorrt_check.py --dry-run        # CPU: the files, up to the build
    python benchmarks/tensorrt_check.py                  # a GPU host with tensorrt installed
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import timm
import torch

import sct_convert as sct
from sct_convert.deploy.int8 import branch_precision
from sct_convert.runtime import open_session


def files(model, scales, folder: Path, images: torch.Tensor):
    out = []
    for s in scales:
        out.append((s, "float", sct.export_onnx(model, folder / f"float_{s}.onnx", scale=s, openvino=False)))
        out.append((s, "int8", sct.export_onnx(model, folder / f"int8_{s}.onnx", scale=s, openvino=False,
                                               int8=sct.Int8(images, symmetric=True))))
    return out


def tensorrt_engine(path: Path, int8: bool, batch: int, hw):
    """Parse and build ``path`` (batch fixed by an optimisation profile); a callable on numpy input."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shape = (batch, 3, *hw)
    profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("the engine build failed (see TensorRT's log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    out_name = engine.get_tensor_name(1)

    def run(x: np.ndarray) -> np.ndarray:
        inp = torch.from_numpy(x).cuda()
        context.set_input_shape(name, tuple(inp.shape))
        out = torch.empty(tuple(context.get_tensor_shape(out_name)), device="cuda")
        context.set_tensor_address(name, inp.data_ptr())
        context.set_tensor_address(out_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--scales", default="224,160")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dry-run", action="store_true", help="stop before the engine build, as on a CPU host")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    scales = [int(s) for s in args.scales.split(",")]
    model = sct.convert(timm.create_model(args.model, num_classes=100), scales)
    images = torch.rand(32, 3, max(scales), max(scales))
    sct.calibrate(model, [images])
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        written = files(model, scales, Path(tmp), images)
        for s, kind, path in written:
            print(f"{args.model} scale {s} {kind}: written and run in onnxruntime, precision "
                  f"{branch_precision(__import__('onnx').load(str(path)))['']}, {path.stat().st_size / 2**20:.1f} MB")
        reason = None
        if args.dry_run:
            reason = "--dry-run"
        elif not torch.cuda.is_available():
            reason = "no CUDA device"
        else:
            try:
                import tensorrt

                print(f"TensorRT {tensorrt.__version__} on {torch.cuda.get_device_name()}")
            except ImportError:
                reason = "the tensorrt package is not installed (pip install tensorrt)"
        if reason:
            print(f"dry run: stopping before the TensorRT engine build ({reason})")
            return 0
        failures = 0
        for s, kind, path in written:
            x = sct.resize_to(torch.rand(args.batch, 3, max(scales), max(scales)), (s, s)).numpy()
            want = open_session(path).run(None, {"images": x})[0]
            try:
                got = tensorrt_engine(path, kind == "int8", args.batch, (s, s))(x)
            except Exception as e:  # noqa: BLE001 - reported per file
                print(f"scale {s} {kind}: TensorRT FAIL: {' '.join(str(e).split())[:300]}")
                failures += 1
                continue
            err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))
            agree = float((got.argmax(1) == want.argmax(1)).mean())
            ok = err <= 1e-3 if kind == "float" else agree >= 0.75
            failures += not ok
            print(f"scale {s} {kind}: TensorRT {'ok' if ok else 'DIFFERS'}: max rel err vs onnxruntime {err:.1e}, "
                  f"top-1 agreement {agree:.0%}")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
