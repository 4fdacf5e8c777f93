"""The ``sct-convert`` command line. Every error is one line on stderr and a non-zero exit."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import click

from ..metadata_fields import ROUTING_POLICIES
from .common import DEFAULT_SCALES, clean_errors, human_bytes, parse_scales, scale_text
from .evaluate import cascade_cmd, evaluate_cmd


class ModelOrCommand(click.Group):
    """``sct-convert resnet50 ...`` converts; ``sct-convert inspect ...`` runs a subcommand."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["convert"] + list(args)
        return super().parse_args(ctx, args)


@click.group(cls=ModelOrCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sct-convert")
def cli() -> None:
    """Convert timm / torchvision CNNs to Scale-Specific BatchNorm and manage their checkpoints.

    \b
    sct-convert resnet50 --out model.safetensors [--scales 224,192,128]
    sct-convert inspect model.safetensors
    sct-convert export model.safetensors --scale 128 --out resnet50_128.safetensors
    sct-convert export model.safetensors --format onnx --out model.onnx
    sct-convert calibrate model.safetensors --images DIR --out calibrated.safetensors
    sct-convert diagnose model.safetensors [--plot divergence.png]
    sct-convert evaluate resnet50 --pretrained --images val/ --scales 224,160,128 --out report.csv
    sct-convert cascade model.safetensors --images val/ --max-drop 0.5 --out model.safetensors
    """


cli.add_command(evaluate_cmd)
cli.add_command(cascade_cmd)


@cli.command("convert")
@click.argument("model_name", metavar="MODEL")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Combined .safetensors to write.")
@click.option("--scales", default=DEFAULT_SCALES, show_default=True, help="Comma list of scales, largest first: ints, or HxW for one non-square scale (224x192 is one scale, 224,192 two).")
@click.option("--source", type=click.Choice(["timm", "torchvision"]), default=None, help="Library when both have MODEL (default: timm).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Weights (.safetensors or .pth, weights only): the original model's, or a converted "
                   "model's training checkpoint (branch keys; give the same --scales).")
@click.option("--pretrained", is_flag=True, help="Use the library's pretrained weights if already cached (never downloads).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier size.")
@click.option("--unknown-scale", type=click.Choice(ROUTING_POLICIES), default="nearest",
              show_default=True, help="what sizes between or beyond the scales run (docs/convert.md)")
@click.option("--per-scale", "per_scale", type=click.Path(file_okay=False), default=None, help="Also write one plain checkpoint per scale here.")
@clean_errors
def convert_cmd(model_name, out, scales, source, checkpoint, pretrained, num_classes, unknown_scale, per_scale):
    """Build MODEL (random init unless weights are given), convert it and write OUT."""
    from ..checkpoints import files as io
    from ..checkpoints import weights
    from ..core.scales import split_branch_key
    from ..conversion.rewrite import convert
    from ..checkpoints.zoo import create_model
    from ..core.model import context_of
    from .._utils.files import writable_directory, writable_file

    scale_list = parse_scales(scales)
    out_path = writable_file(out)
    if per_scale:  # check every output before writing any, so a bad one changes nothing
        writable_directory(per_scale, "per-scale checkpoints")
    model, source = create_model(model_name, source, pretrained=pretrained, num_classes=num_classes)
    state = weights.read_weights(checkpoint) if checkpoint else None
    trained_converted = state is not None and weights.has_branches(state)

    if state is not None and not trained_converted:
        weights.load_state(model, state, checkpoint)
    model.eval()
    convert(model, scale_list, unknown_scale)
    if trained_converted:  # a converted model's training checkpoint (timm train.py, Lightning, ...)
        held = sorted({parts[1] for parts in map(split_branch_key, state) if parts is not None})
        wanted = sorted(context_of(model).keys)
        if held != wanted:
            raise ValueError(f"{checkpoint} holds a converted model with scales {', '.join(held)}; "
                             f"pass --scales {','.join(held)} (got {', '.join(wanted)})")
        weights.load_state(model, state, checkpoint)
    path = io.save(model, out_path, arch=model_name, source=source)
    layers = len(context_of(model).report.converted)
    extra = ""
    if per_scale:
        files = io.save_per_scale(model, per_scale, arch=model_name, source=source, progress=True)
        extra = f"; {len(files)} per-scale checkpoints in {per_scale}"
    click.echo(
        f"converted {source} {model_name}: {layers} batch-norm layers x {len(scale_list)} scales "
        f"({', '.join(map(scale_text, scale_list))}); wrote {path} "
        f"({human_bytes(path.stat().st_size)}){extra}"
    )


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or (Path(b).exists() and os.path.samefile(a, b))
    except OSError:
        return False


@cli.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@clean_errors
def inspect_cmd(file):
    """Print a file's architecture, scales and routing (combined .safetensors, .onnx or .pt2)."""
    if str(file).endswith((".onnx", ".pt2")):
        from ..checkpoints.format import versions_of
        from ..core.scales import scales_from_json
        from ..deploy.api import read_deploy_metadata

        meta = read_deploy_metadata(file)
        scales = scales_from_json(meta.get("scales", "[]"))
        click.echo(f"file:            {file} ({meta.get('format')})")
        click.echo(f"architecture:    {meta.get('arch')} ({meta.get('source')})")
        click.echo(f"scales:          {', '.join(map(scale_text, scales))}")
        if meta.get("part"):
            _detector_file_lines(meta)
        elif meta.get("scale"):
            click.echo(f"this file:       scale {meta['scale']} only (plain architecture)")
        else:
            how = ("blending the two nearest branches in between" if meta.get("routing") == "interpolate"
                   else "nearest by pixel count")
            click.echo(f"this file:       every scale, routed in the graph ({how})")
            if meta.get("routing_note"):
                click.echo(f"note:            {meta['routing_note']}")
        if str(file).endswith(".onnx"):
            _precision_lines(file, meta)
        click.echo(f"num classes:     {meta.get('num_classes', '?')}")
        layout = meta.get("input_layout") or "(N, C, H, W)"
        click.echo(f"input:           {meta.get('input_name')} {layout.replace('C', meta.get('in_chans') or 'C', 1)}")
        click.echo(f"written by:      {versions_text(versions_of(meta, file))}")
        return
    from ..checkpoints.files import describe

    info = describe(file)
    click.echo(f"file:            {file}")
    click.echo(f"architecture:    {info['arch']} ({info['source']})")
    click.echo(f"scales:          {', '.join(map(scale_text, info['scales']))}")
    click.echo(f"unknown scale:   {info['unknown_scale']}")
    click.echo(f"num classes:     {info['num_classes']}")
    click.echo(f"S-BN layers:     {info['layers']}")
    click.echo(f"parameters:      {info['params_total']:,} (all branches)")
    click.echo(
        f"per extra scale: +{info['params_per_extra_scale']:,} parameters "
        f"({100 * info['overhead_per_extra_scale']:.2f}%), "
        f"+{human_bytes(info['bytes_per_extra_scale'])} on disk"
    )
    click.echo(f"written by:      {versions_text(info['versions'])}")


def _precision_lines(file: str, meta: Dict[str, str]) -> None:
    """Precision as read from the graph (per branch for a switchable file), not as claimed."""
    import onnx

    from ..deploy.int8 import branch_precision

    precision = branch_precision(onnx.load(str(file), load_external_data=False))
    if list(precision) == [""]:
        click.echo(f"precision:       {precision['']}")
    else:
        click.echo("precision:       " + ", ".join(f"{label}: {p}" for label, p in precision.items()))
    if meta.get("int8"):
        settings = json.loads(meta["int8"])
        click.echo(f"int8:            {settings.get('activations')} activations, {settings.get('weights')} weights, "
                   f"ranges {settings.get('ranges')} ({settings.get('images')} calibration images)")
    for label, row in json.loads(meta.get("int8_report", "{}")).items():
        click.echo(f"int8 top-1:      scale {label}: {row.get('float_top1')}% float -> {row.get('int8_top1')}% int8")
    if meta.get("checked_in"):
        click.echo(f"checked in:      {meta['checked_in']}")


def versions_text(versions: Dict[str, str]) -> str:
    """What wrote a file, from its ``versions`` field: ``sct-convert 0.1.0, torch 2.15.0, ...``."""
    return ", ".join(f"{name.replace('_', '-')} {v}" for name, v in versions.items()) or "(not recorded)"


def _detector_file_lines(meta: Dict[str, str]) -> None:
    """What a detector file holds, for ``inspect``: the part, its scales, each transform size."""
    scales = f"scale {meta['scale']} only" if meta.get("scale") else "every scale, routed by its 'size' input"
    if meta["part"] == "core":
        click.echo(f"this file:       the core (backbone and heads), {scales}; pre/post-process with "
                   "sct.detector_preprocess / sct.detector_postprocess")
        click.echo(f"outputs:         {meta.get('outputs', '?').replace(',', ', ')}")
    else:
        click.echo(f"this file:       the whole detector (transform, backbone, heads, post-processing), {scales}")
    sizes = json.loads(meta.get("transform_sizes", "{}"))
    for key, attrs in sizes.items():
        text = ", ".join(f"{k}={v[0] if isinstance(v, list) and len(v) == 1 else v}" for k, v in attrs.items())
        click.echo(f"transform {key + ':':<6}  {text}".rstrip())
    click.echo(f"exporter:        {meta.get('exporter', '?')}")
    click.echo(f"checked:         {_detector_check_text(meta)}")


def _detector_check_text(meta: Dict[str, str]) -> str:
    """What a detector file's onnxruntime check saw, for ``inspect``."""
    if "max_error" not in meta:
        return "not run (export_onnx(check=False), or no onnxruntime)"
    matched = int(meta.get("checked_detections", "0"))
    if matched == 0:
        return ("it ran in onnxruntime, but no detection scored clearly above the rest (a random-init model?), "
                "so none was compared")
    if meta.get("part") == "core":
        return (f"pre + core + post in onnxruntime: {matched} detections matched the eager model's, max error "
                f"{meta['max_error']} (raw outputs {meta.get('max_core_error', '?')})")
    return f"{matched} detections matched sct.extract's in onnxruntime, max error {meta['max_error']}"


@cli.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["safetensors", "onnx", "pt2"]), default="safetensors",
              show_default=True, help="Plain checkpoint, ONNX file, or torch.export program.")
@click.option("--scale", "scale_option", default=None,
              help="The scale to export, e.g. 128 or 128x96 (onnx/pt2: omit for one file that serves every scale).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write.")
@click.option("--model", "model_name", default=None, help="Architecture, when the file records none (timm/torchvision name).")
@click.option("--part", type=click.Choice(["model", "core"]), default="model", show_default=True,
              help="Detectors, onnx: the whole detector of one scale, or its core (backbone and heads; "
                   "without --scale one file for every scale).")
@click.option("--int8", is_flag=True, help="onnx: an int8 QDQ file (uint8 activations, int8 per-channel weights), "
                                          "each scale calibrated on --calibration-images resized to it.")
@click.option("--calibration-images", type=click.Path(file_okay=False), default=None,
              help="--int8: ImageFolder-style directory of calibration images (labels unused).")
@click.option("--calibration-count", default=256, show_default=True, type=click.IntRange(min=1),
              help="--int8: calibration images per scale.")
@click.option("--report-images", type=click.Path(file_okay=False), default=None,
              help="--int8: labelled ImageFolder directory (as for evaluate): print each scale's top-1 in float and int8.")
@click.option("--symmetric", is_flag=True, help="--int8: int8 symmetric activations (TensorRT's Q/DQ) instead of uint8.")
@click.option("--reduce-range", is_flag=True, help="--int8: 7-bit weights, for CPUs without VNNI.")
@click.option("--exclude-types", default="", help="--int8: comma list of op types left in float (e.g. Gemm).")
@click.option("--exclude-nodes", default="", help="--int8: comma list of node names left in float.")
@clean_errors
def export_cmd(file, fmt, scale_option, out, model_name, part, int8, calibration_images, calibration_count,
               report_images, symmetric, reduce_range, exclude_types, exclude_nodes):
    """Write FILE as a plain checkpoint of one scale, or as an ONNX / torch.export file.

    ONNX and pt2 files without --scale serve every trained scale: the branch is picked in the
    graph from the input's size (nearest by pixel count between scales). A torchvision
    detector's ONNX file holds one scale's whole detector, or with --part core its backbone and
    heads (sct.detector_preprocess / detector_postprocess do the rest; docs/deploy.md).
    """
    from ..checkpoints import files as io
    from ..checkpoints import format as metadata
    from ..checkpoints.zoo import create_model

    s = None
    if _same_file(file, out):
        raise ValueError(f"--out {out} is the input file; exporting over it would lose the other "
                         "scales: write to another file")
    meta = metadata.checked_metadata(file)
    if scale_option is not None:
        scales_given = parse_scales(scale_option, "--scale")
        if len(scales_given) != 1:
            raise ValueError(f"--scale takes one scale, got {scale_option!r}")
        (s,) = scales_given
        if s not in metadata.file_scales(meta):
            raise ValueError(
                f"scale {scale_text(s)} is not in {file}; it holds "
                f"{', '.join(map(scale_text, metadata.file_scales(meta)))}"
            )
    elif fmt == "safetensors":
        raise ValueError("--scale is required for --format safetensors (a plain checkpoint holds one "
                         "scale); for every scale in one file use --format onnx or pt2")
    if part != "model" and fmt != "onnx":
        raise ValueError(f"--part {part} is for --format onnx (a detector's core as an ONNX file)")
    int8_options = calibration_images or report_images or symmetric or reduce_range or exclude_types or exclude_nodes
    if int8_options and not int8:
        raise ValueError("--calibration-images, --report-images, --symmetric, --reduce-range and --exclude-* "
                         "are --int8 options: add --int8")
    if int8 and fmt != "onnx":
        raise ValueError("--int8 writes an ONNX file: add --format onnx")
    if int8 and not calibration_images:
        raise ValueError("--int8 needs --calibration-images DIR: a folder of images like the ones the model "
                         "will see (a few hundred are enough; labels unused)")
    if int8:
        from .._utils.files import existing_directory

        existing_directory(calibration_images, "--calibration-images")
        if report_images:
            existing_directory(report_images, "--report-images")
    if fmt == "onnx":
        from ..deploy.onnx_trace import require_onnx

        require_onnx()  # before the model is built: say what to install first
    model: Optional[object] = None
    if model_name:
        model, _ = create_model(model_name)
    converted = io.load(file, model=model).eval()
    what = f"at scale {scale_text(s)}" if s is not None else "serving every scale"
    if fmt == "safetensors":
        path = io.export(converted, s, out, arch=meta.get("arch") or model_name, source=meta.get("source"))
    else:
        from ..deploy import api as deploy

        if fmt == "onnx":
            config = None
            if int8:
                config = _int8_config(converted, calibration_images, calibration_count, report_images, symmetric,
                                      reduce_range, exclude_types, exclude_nodes)
            path = deploy.export_onnx(converted, out, s, progress=True, part=part, int8=config)
            if int8:
                what = f"{what}, int8"
                _echo_int8(path)
        else:
            path = deploy.export_program(converted, out, s, progress=True)
    if part == "core":
        what = f"core {what}"
    click.echo(f"wrote {path}: {meta.get('arch') or model_name} {what} ({fmt})")


def _split(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _int8_config(model, calibration_images, count, report_images, symmetric, reduce_range, exclude_types,
                 exclude_nodes):
    """The CLI's :class:`~sct_convert.Int8`: images read as ``evaluate`` reads them (timm's data
    config, at the largest scale), up to ``count`` of them in a seeded shuffle of the folder."""
    import torch

    from ..core.model import context_of
    from ..core.scales import largest_index
    from ..deploy.int8 import Int8
    from ..evaluation.data import image_dataset, loader_at, resolve_data_config, split_indices

    config = resolve_data_config(model)
    largest = context_of(model).sizes[largest_index(context_of(model).sizes)]

    def loader(root, what, limit):
        dataset = image_dataset(root, config, what=what)
        _, indices = split_indices(len(dataset), holdout=len(dataset), max_images=None)
        return loader_at(dataset, indices[:limit], config, largest, 32, 0)

    images = torch.cat([x for x, _ in loader(calibration_images, "--calibration-images", count)])
    labelled = loader(report_images, "--report-images", None) if report_images else None
    return Int8(images, symmetric=symmetric, reduce_range=reduce_range, exclude_types=_split(exclude_types),
                exclude_nodes=_split(exclude_nodes), max_images=count, labelled=labelled)


def _echo_int8(path) -> None:
    from ..deploy.api import read_deploy_metadata

    meta = read_deploy_metadata(path)
    for label, row in json.loads(meta.get("int8_report", "{}")).items():
        click.echo(f"scale {label}: top-1 {row['float_top1']:.2f}% float, {row['int8_top1']:.2f}% int8 "
                   f"({row['change']:+.2f} points; same top-1 on {row['agreement']:.1f}% of {row['images']} images)")


@cli.command("calibrate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--images", required=True, type=click.Path(file_okay=False), help="ImageFolder-style directory (labels unused).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Calibrated combined .safetensors to write.")
@click.option("--batches", default=100, show_default=True, type=click.IntRange(min=1),
              help="Batches of images to estimate each scale's statistics from.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--add-scale", "add", default=None, help="Add this scale (e.g. 160 or 160x128) before calibrating.")
@clean_errors
def calibrate_cmd(file, images, out, batches, batch_size, add):
    """Re-estimate every branch's BN statistics from IMAGES (no labels, no training).

    Images are read and preprocessed as sct-convert evaluate reads them (timm's data config,
    resized and center-cropped to the largest scale); calibration resizes them to each scale.
    """
    from ..checkpoints import files as io
    from ..checkpoints import format as metadata
    from ..core.model import context_of
    from ..core.scales import largest_index
    from ..evaluation.data import image_dataset, loader_at, resolve_data_config, split_indices
    from ..training.calibration import add_scale, calibrate
    from .._utils.files import existing_directory, writable_file

    existing_directory(images, "--images")
    writable_file(out)
    meta = metadata.checked_metadata(file)
    model = io.load(file)
    if add:
        added = parse_scales(add, "--add-scale")
        if len(added) != 1:
            raise ValueError(f"--add-scale takes one scale, got {add!r}")
        add_scale(model, added[0])
    config = resolve_data_config(model)
    dataset = image_dataset(images, config, what="--images")
    sizes = context_of(model).sizes
    # every image in a seeded shuffle, so the first batches come from across the folder's classes
    _, indices = split_indices(len(dataset), holdout=len(dataset), max_images=None)
    loader = loader_at(dataset, indices, config, sizes[largest_index(sizes)], batch_size, 0)
    calibrate(model, loader, num_batches=batches, progress=True)
    path = io.save(model, out, arch=meta.get("arch"), source=meta.get("source"))
    n = min(batches, len(loader))
    images_used = min(len(dataset), n * batch_size)
    click.echo(f"calibrated {len(context_of(model).scales)} scales on {n} batch{'es' if n != 1 else ''} "
               f"({images_used} images) from {images}; wrote {path}")


@cli.command("diagnose")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Write a PNG of divergence against depth.")
@clean_errors
def diagnose_cmd(file, plot):
    """Per BN layer, how far apart the branches' statistics are (symmetric KL)."""
    from ..checkpoints import files as io
    from ..training.diagnostics import branch_divergence

    model = io.load(file)
    rows = branch_divergence(model, plot=plot)
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    click.echo(f"{'#':>3s} {'layer':40s} " + " ".join(f"{p:>12s}" for p in pairs))
    by_layer = {}
    for r in rows:
        by_layer.setdefault((r["index"], r["layer"]), {})[r["pair"]] = r["divergence"]
    for (i, name), values in by_layer.items():
        click.echo(f"{i:3d} {name[-40:]:40s} " + " ".join(f"{values[p]:12.4g}" for p in pairs))
    if plot:
        click.echo(f"wrote {plot}")


def main(argv: Optional[List[str]] = None) -> None:
    """The console script: every error, usage errors included, is one ``Error:`` line and exit 1."""
    try:
        code = cli.main(args=argv, prog_name="sct-convert", standalone_mode=False)
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "sct-convert"
        click.echo(f"Error: {' '.join(e.format_message().split())} (see {where} --help)", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

