"""Every torchvision family (classifier, segmentation, video, detection): convert, train with
SCTLoss, routing, per-scale checkpoints, and every deployment file run in its runtime at every
trained scale and one size between.

For each model: ``sct.convert`` (video models without ``example_input``: the probe finds a clip
length); one SCT training step (``SCTLoss`` over a train-mode forward; segmentation with
torchvision's reference criterion and label maps at the input's size; backward); eval routing
at every scale equals ``sct.extract`` at that scale; each scale's ``sct.save_per_scale`` file
loads strictly into a freshly built plain model; a switchable ``torch.export`` program, a
switchable ONNX file and a per-scale ONNX file (smallest scale), float and int8 (calibrated on
8 random inputs), each run (``torch.export.load``, onnxruntime) against the eager model on every
output tensor, at every scale and one in-between size (video: clips of 6 frames, not the probe's
length); a detector's per-scale file and its switchable core (``part="core"``, with
``sct.detector_preprocess`` / ``detector_postprocess``) against the eager model's detections.
Every ONNX file is also run in OpenVINO (CPU, f32 inference precision) against onnxruntime on
the same inputs (columns ``... OpenVINO``; float files must agree within 1e-4). A file that cannot be written must be refused with no
file left behind.

    python benchmarks/family_check.py                      # every family, ~15 min on 2 CPU cores
    python benchmarks/family_check.py --only segmentation  # one family
    python benchmarks/family_check.py --only detection --formats "onnx core"   # the detector cores
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
import traceback
import warnings

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision

import sct_convert as sct
from sct_convert.training.dense import iter_tensors

warnings.simplefilter("ignore")


def models():
    """(family, name, builder of the plain model, scales, probe lead for test inputs)."""
    tv = torchvision.models
    yield "classifier", "timm resnet18", functools.partial(timm.create_model, "resnet18", num_classes=10), [96, 64], (1, 3)
    for name, aux in (("fcn_resnet50", True), ("deeplabv3_resnet50", True),
                      ("deeplabv3_mobilenet_v3_large", True), ("lraspp_mobilenet_v3_large", False)):
        kwargs = dict(weights=None, weights_backbone=None, num_classes=5, **({"aux_loss": True} if aux else {}))
        yield "segmentation", f"torchvision {name}", functools.partial(getattr(tv.segmentation, name), **kwargs), [96, 64], (1, 3)
    for name in ("r3d_18", "mc3_18", "r2plus1d_18"):
        yield "video", f"torchvision {name}", functools.partial(getattr(tv.video, name), weights=None, num_classes=4), [64, 48], (1, 3, 6)
    yield "video", "torchvision s3d", functools.partial(tv.video.s3d, weights=None, num_classes=4), [256, 224], (1, 3, 16)
    for name in tv.list_models(module=tv.detection):  # every detector; scales are transform sizes
        scales = [320, 256] if ("320" in name or name.startswith("ssd")) else [256, 192]
        if name == "ssd300_vgg16":
            scales = [300, 256]
        kwargs = dict(weights=None, weights_backbone=None, num_classes=3)
        if name.startswith("keypointrcnn"):
            kwargs["num_keypoints"] = 5
        if name.startswith(("fcos", "retinanet")):  # a random head scores every box under the threshold
            kwargs["score_thresh"] = 0.0
        yield "detection", f"torchvision {name}", functools.partial(getattr(tv.detection, name), **kwargs), scales, (1, 3)


def reference_criterion(inputs, target):
    """torchvision's references/segmentation criterion."""
    losses = {name: F.cross_entropy(x, target, ignore_index=255) for name, x in inputs.items()}
    return losses["out"] if len(losses) == 1 else losses["out"] + 0.5 * losses["aux"]


def rel(want, got) -> float:
    """Worst relative error over every output tensor (the file's outputs in order)."""
    wants = [t.float() for t in iter_tensors(want)]
    onnx_outputs = isinstance(got, list) and all(isinstance(g, np.ndarray) for g in got)
    gots = [torch.as_tensor(np.asarray(g)).float() for g in (got if onnx_outputs else iter_tensors(got))]
    if len(wants) != len(gots):
        raise ValueError(f"{len(gots)} outputs, the eager model returns {len(wants)}")
    return max((float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(wants, gots) if a.numel()),
               default=0.0)


def detection_batch(keypoints: bool = False, masks: bool = False):
    images = [torch.rand(3, 200, 260), torch.rand(3, 240, 180)]
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        t = {"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0]]), "labels": torch.tensor([1])}
        if masks:
            t["masks"] = torch.zeros(1, h, w, dtype=torch.uint8)
            t["masks"][0, 20:150, 10:120] = 1
        if keypoints:
            t["keypoints"] = torch.tensor([[[20.0, 30.0, 1.0]] * 5])
        targets.append(t)
    return images, targets


def train_step(family, model, lead, scales) -> str:
    model.train()
    if family == "detection":  # torchvision's reference loop: the model returns its losses
        names = {type(m).__name__ for m in model.modules()}
        images, targets = detection_batch("KeypointRCNNHeads" in names, "MaskRCNNHeads" in names)
        loss_dict = model(images, targets)
        sum(loss_dict.values()).backward()
        model.zero_grad(set_to_none=True)
        return f"ok ({len(loss_dict.per_scale)} scales, losses {[round(float(sum(v.values())), 2) for v in loss_dict.per_scale.values()]})"
    x = torch.randn(2, *lead[1:], scales[0], scales[0])
    if family == "segmentation":
        y = torch.randint(0, 5, (2, scales[0], scales[0]))
        y[:, :4] = 255
        criterion = sct.SCTLoss(reference_criterion)
    else:
        y, criterion = torch.randint(0, 3, (2,)), sct.SCTLoss(torch.nn.CrossEntropyLoss())
    out = model(x)
    criterion(out, y).backward()
    model.zero_grad(set_to_none=True)
    return f"ok ({len(out)} scales, losses {[round(v.item(), 2) for v in criterion.last_losses.values()]})"


FORMATS = ("per-scale ckpt", "pt2", "onnx", "onnx per-scale", "onnx core", "onnx int8", "onnx int8 per-scale")


def openvino_cpu(path):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda feeds: [np.asarray(v) for v in compiled(feeds).values()]


def openvino_row(path, feeds_at, int8=False) -> str:
    """The file in OpenVINO against onnxruntime on the same inputs: worst relative error over every
    output (int8: also the share of class argmaxes, per image or per pixel, that agree; the
    runtimes' int8 kernels round differently, and with random weights and random calibration
    inputs the int8 answer itself is far from the float one: these rows say that the file loads,
    compiles and runs, the trained Fashion-MNIST files in benchmarks/int8.py say how well)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ov = openvino_cpu(path)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"OpenVINO FAIL to load: {' '.join(str(e).split())[-200:]}"
    errs, agree = [], []
    for label, feeds in feeds_at:
        try:
            got, want = ov(feeds), session.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            return f"OpenVINO RUN FAIL at {label}: {' '.join(str(e).split())[-200:]}"
        errs.append(rel([torch.as_tensor(w) for w in want], got))
        if int8:
            agree.append(float((want[0].argmax(1) == got[0].argmax(1)).mean()))  # per image, or per pixel
    tail = f", argmax agree {min(agree):.0%}" if int8 else ""
    ok = "ok" if int8 or max(errs) <= 1e-4 else "DIFFERS"
    return f"{ok} at {[label for label, _ in feeds_at]}, max rel err vs onnxruntime {max(errs):.1e}{tail}"


def check_files(model, build, scales, lead, sizes, d, formats=FORMATS) -> dict:
    row = {}
    if sct.context_of(model).resizer and "onnx core" in formats:
        row["onnx core"] = detector_core_row(model, os.path.join(d, "m_core.onnx"))
        if os.path.exists(os.path.join(d, "m_core.onnx")):
            row["onnx core OpenVINO"] = detector_core_openvino_row(model, os.path.join(d, "m_core.onnx"))
    try:
        if "per-scale ckpt" in formats:
            paths = sct.save_per_scale(model, d, arch="m")
            for path in paths:
                sct.load_plain(build().eval(), path)
            row["per-scale ckpt"] = f"ok ({len(paths)} load strictly into the plain model)"
    except Exception as e:  # noqa: BLE001
        row["per-scale ckpt"] = f"FAIL {type(e).__name__}: {str(e)[:100]}"
    example = torch.randn(2, *lead[1:], scales[0], scales[0])
    small = min(scales)
    calibration = torch.randn(8, *lead[1:], scales[0], scales[0])
    detector = bool(sct.context_of(model).resizer)
    for fmt, write, scale in (("pt2", sct.export_program, None), ("onnx", sct.export_onnx, None),
                              ("onnx per-scale", sct.export_onnx, small), ("onnx int8", sct.export_onnx, None),
                              ("onnx int8 per-scale", sct.export_onnx, small)):
        if fmt not in formats or (detector and "int8" in fmt):
            continue
        path = os.path.join(d, f"m_{fmt.replace(' ', '_')}.{fmt.split()[0]}")
        extra = {"int8": calibration} if "int8" in fmt else {}
        try:
            write(model, path, scale, example_input=example if scale is None else
                  torch.randn(2, *lead[1:], small, small), **extra)
        except Exception as e:  # noqa: BLE001
            left = [f for f in os.listdir(d) if f.startswith(os.path.basename(path))]
            row[fmt] = f"refused ({type(e).__name__}: {' '.join(str(e).split())[:600]}); files left: {left or 'none'}"
            continue
        if fmt == "onnx per-scale" and detector:  # one image in, detections out
            row[fmt] = detector_file_row(model, path, scale)
            image = detection_batch()[0][0]
            row[f"{fmt} OpenVINO"] = openvino_row(path, [("200x260", {"images": image.numpy()})])
            continue
        if fmt == "pt2":
            call = torch.export.load(path).module()
        else:
            import onnxruntime as ort

            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            call = functools.partial(lambda sess, x: sess.run(None, {"images": x.numpy()}), session)
        errs, at = [], (sizes if scale is None else [small])
        try:
            with torch.no_grad():
                for s in at:
                    x = torch.randn(2, *lead[1:], s, s)
                    errs.append(rel(model(x), call(x)))
            row[fmt] = f"ok at {at}, max rel err {max(errs):.1e}" + (" (int8 vs float)" if "int8" in fmt else "")
        except Exception as e:  # noqa: BLE001
            row[fmt] = f"RUN FAIL at size {at[len(errs)]}: {type(e).__name__}: {str(e)[:100]}"
        if fmt != "pt2":
            feeds = [(s, {"images": torch.randn(2, *lead[1:], s, s).numpy()}) for s in at]
            row[f"{fmt} OpenVINO"] = openvino_row(path, feeds, int8="int8" in fmt)
    return row


def blobs(n, hw=(300, 400)):
    """Images with structure at several sizes: a random-init detector calibrated on them scores
    boxes apart (white noise leaves every score tied)."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 8, generator=g), size=hw, mode="bicubic")
    return (0.8 * smooth + 0.2 * torch.rand(n, 3, *hw, generator=g)).clamp(0, 1)


def detector_file_row(model, path, scale) -> str:
    """A detector's per-scale ONNX file: the route that wrote it, and its detections against
    ``sct.extract(model, scale)`` on two more image sizes in onnxruntime (matched as the export's
    own check matches them)."""
    from sct_convert.deploy.api import read_deploy_metadata
    from sct_convert.deploy.detector_onnx import check_detector_file, structured_image

    meta = read_deploy_metadata(path)
    plain = sct.extract(model, scale).eval()
    names = meta["outputs"].split(",")
    sizes = [(280, 360), (400, 300)]
    error, _ = check_detector_file(path, plain, names, sizes, float("inf"))
    with torch.no_grad():
        found = [len(plain([structured_image(hw, seed)])[0]["scores"]) for seed, hw in enumerate(sizes)]
    return (f"ok via {meta['exporter']}, max error {error:.1e} at 280x360, 400x300 ({found[0]}, {found[1]} "
            f"eager detections; the export's own check: {meta.get('max_error')})")


def detector_core_row(model, path) -> str:
    """A detector's switchable core file (every scale): the route that wrote it, and at every
    scale pre + file + post in onnxruntime against the eager model on three images of both
    orientations (matched as the export's own check matches them)."""
    import onnxruntime as ort

    from sct_convert.deploy.api import read_deploy_metadata
    from sct_convert.deploy.detector_onnx import structured_image, compare_detections

    try:
        sct.export_onnx(model, path, part="core")
    except Exception as e:  # noqa: BLE001
        return f"refused ({type(e).__name__}: {' '.join(str(e).split())[:600]}); file left: {os.path.exists(path)}"
    meta = read_deploy_metadata(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    sizes = [(280, 360), (400, 300), (200, 420)]
    images = [structured_image(hw, 10 + seed) for seed, hw in enumerate(sizes)]
    worst, matched = 0.0, 0
    with torch.no_grad():
        for s in sct.scales_of(model):
            batch = sct.detector_preprocess(model, images, s)
            got = sct.detector_postprocess(model, dict(zip(names, session.run(None, batch.feeds()))), batch)
            with sct.scale(model, s):
                want = model(images)
            for g, w, hw in zip(got, want, sizes):
                error, n = compare_detections(w, g, hw)
                worst, matched = max(worst, error), matched + n
    return (f"ok via {meta['exporter']}, {len(names)} outputs, max error {worst:.1e} over {matched} detections at "
            f"every scale, images 280x360, 400x300, 200x420 (the export's own check: {meta.get('max_error')})")


def detector_core_openvino_row(model, path) -> str:
    """The switchable core in OpenVINO against onnxruntime, on the batch ``sct.detector_preprocess``
    builds at every scale."""
    from sct_convert.deploy.detector_onnx import structured_image

    images = [structured_image(hw, 10 + seed) for seed, hw in enumerate([(280, 360), (400, 300)])]
    feeds = [(s, {k: np.asarray(v) for k, v in sct.detector_preprocess(model, images, s).feeds().items()})
             for s in sct.scales_of(model)]
    return openvino_row(path, feeds)


def check(family, name, build, scales, lead, formats=FORMATS) -> dict:
    row = {"family": family, "model": name}
    t0 = time.time()
    try:
        model = sct.convert(build(), scales)
        row["convert"] = f"ok (probe input {'x'.join(map(str, sct.context_of(model).probe_lead))}xHxW)"
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["convert"] = f"FAIL {type(e).__name__}: {str(e)[:120]}"
        return row
    sizes = list(scales) + [(scales[0] + scales[1]) // 2]
    try:
        row["SCT train step"] = train_step(family, model, lead, scales)
    except Exception as e:  # noqa: BLE001
        row["SCT train step"] = f"FAIL {type(e).__name__}: {str(e)[:100]}"
    model.eval()
    with torch.no_grad():
        errs = []
        for s in scales:
            if family == "detection":  # the branch and the transform's size, against the plain model at s
                images, _ = detection_batch()
                with sct.scale(model, s):
                    errs.append(rel(model(images), sct.extract(model, s).eval()(images)))
                continue
            x = torch.randn(*lead, s, s)
            errs.append(rel(model(x), sct.extract(model, s).eval()(x)))
        row["route == extract"] = f"max {max(errs):.1e}"
    if family == "detection":  # per-scale statistics, so that its detections are not all tied
        sct.calibrate(model, [blobs(4)], num_batches=1)
        model.eval()
    with tempfile.TemporaryDirectory() as d:
        row.update(check_files(model, build, scales, lead, sizes, d, formats))
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated families")
    p.add_argument("--models", default="", help="comma-separated substrings of model names")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of: {', '.join(FORMATS)}")
    args = p.parse_args()
    formats = [f.strip() for f in args.formats.split(",")]
    only = set(filter(None, args.only.split(",")))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")
    for family, name, build, scales, lead in models():
        if only and family not in only:
            continue
        if args.models and not any(m in name for m in args.models.split(",")):
            continue
        try:
            row = check(family, name, build, scales, lead, formats)
        except Exception:  # noqa: BLE001
            row = {"family": family, "model": name, "error": traceback.format_exc(limit=2)}
        print()
        for k, v in row.items():
            print(f"  {k:18s} {v}", flush=True)


if __name__ == "__main__":
    main()
