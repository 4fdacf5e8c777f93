"""``sct-convert evaluate``: accuracy and latency per scale, plain, calibrated or trained."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple

import click

from .common import DEFAULT_SCALES, clean_errors, parse_scales

REPORT_SUFFIXES = (".csv", ".md", ".json")


def _model(model_arg: str, source: str, checkpoint: Optional[str], pretrained: bool, num_classes: Optional[int],
           in_chans: Optional[int]) -> Tuple[Any, str]:
    """(model, description): an sct file's converted model, or a named model with its weights."""
    from ..checkpoints import files as io
    from ..checkpoints import format as metadata
    from ..checkpoints import weights
    from ..checkpoints.zoo import create_model

    if model_arg.endswith(".safetensors"):
        if checkpoint or pretrained:
            raise ValueError(f"{model_arg} is a converted model file: it holds its weights, drop "
                             "--checkpoint / --pretrained")
        meta = metadata.checked_metadata(model_arg)
        return io.load(model_arg), f"{meta.get('arch') or 'model'} from {model_arg} (SCT-trained branches)"
    kwargs = {"in_chans": in_chans} if in_chans else {}
    model, source = create_model(model_arg, source, pretrained=pretrained, num_classes=num_classes, **kwargs)
    what = f"{source} {model_arg}"
    if checkpoint:
        state = weights.read_weights(checkpoint)
        if weights.has_branches(state):
            raise ValueError(f"{checkpoint} holds a converted model's branches: write it as an sct file first "
                             f"(sct-convert {model_arg} --checkpoint {checkpoint} --scales ... --out m.safetensors), "
                             "then evaluate m.safetensors")
        weights.load_state(model, state, checkpoint)
        what += f" with {checkpoint}"
    elif pretrained:
        what += " (pretrained)"
    else:
        what += " (random init: pass --checkpoint or --pretrained for meaningful accuracy)"
    return model, what


def _floats(text: Optional[str], option: str) -> Optional[Tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None


@click.command("evaluate")
@click.argument("model_arg", metavar="MODEL")
@click.option("--images", required=True, type=click.Path(), help="Labelled folder to score: one sub-folder per class.")
@click.option("--scales", default=DEFAULT_SCALES, show_default=True, help="Sizes to score, e.g. 224,192,160,128 (HxW for non-square).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Report to write: .csv, .md or .json.")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Also a PNG: accuracy against size and latency.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="The plain model's weights (.safetensors or .pth).")
@click.option("--pretrained", is_flag=True, help="The library's pretrained weights, if already cached (never downloads).")
@click.option("--source", type=click.Choice(["timm", "torchvision"]), default=None, help="Library when both have MODEL.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier size of the checkpoint.")
@click.option("--in-chans", type=click.IntRange(min=1), default=None, help="Input channels (timm models), e.g. 1 for grayscale.")
@click.option("--calibrate-images", default=None, type=click.Path(), help="Images for the calibrated arm (default: hold out part of --images).")
@click.option("--holdout", default=1000, show_default=True, type=click.IntRange(min=1), help="Images of --images held out for calibration when --calibrate-images is not given.")
@click.option("--max-images", default=None, type=click.IntRange(min=1), help="Score at most this many images.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--mean", default=None, help="Override the data config's mean, e.g. 0.286 or 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Override the data config's std.")
@click.option("--crop-pct", default=None, type=click.FloatRange(min=0.01, max=1.0), help="Override crop_pct (resize to size / crop_pct, then center crop).")
@click.option("--interpolation", default=None, type=click.Choice(["bilinear", "bicubic", "nearest"]), help="Override the resize interpolation.")
@click.option("--latency-repeats", default=5, show_default=True, type=click.IntRange(min=0), help="Timed forwards per cell (batch 1 and 32); 0 skips latency.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="DataLoader worker processes.")
@click.option("--cascade", is_flag=True, help="Also cascades of the scales (max_drop 0, 0.3, 0.5, 1), fitted on half the images, "
              "scored on the other half; --plot draws accuracy against MACs.")
@clean_errors
def evaluate_cmd(model_arg, images, scales, out, plot, checkpoint, pretrained, source, num_classes, in_chans,
                 calibrate_images, holdout, max_images, batch_size, mean, std, crop_pct, interpolation,
                 latency_repeats, workers, cascade):
    """Score MODEL at every scale: as it is, calibrated per scale, or (an sct file) its own branches.

    \b
    sct-convert evaluate resnet50 --pretrained --images val/ --scales 224,192,160,128 --out report.csv
    sct-convert evaluate model.safetensors --images val/ --out report.md --plot curve.png
    sct-convert evaluate model.safetensors --images val/ --cascade --out report.md --plot curve.png
    """
    from ..evaluation.run import evaluate
    from .._utils.files import existing_directory, writable_file

    scale_list = parse_scales(scales)
    out_path = Path(out)
    if out_path.suffix not in REPORT_SUFFIXES:
        raise ValueError(f"--out {out}: the report is written as .csv, .md or .json")
    for path in filter(None, (out_path, plot)):
        writable_file(path)
    for folder, option in ((images, "--images"), (calibrate_images, "--calibrate-images")):
        if folder is not None:
            existing_directory(folder, option)
    model, what = _model(model_arg, source, checkpoint, pretrained, num_classes, in_chans)
    click.echo(f"evaluating {what} at {len(scale_list)} scales on {images}", err=True)
    overrides = {"mean": _floats(mean, "--mean"), "std": _floats(std, "--std"), "crop_pct": crop_pct,
                 "interpolation": interpolation}
    report = evaluate(model, images, scale_list, calibrate_images=calibrate_images, holdout=holdout,
                      max_images=max_images, batch_size=batch_size, data_config=overrides,
                      latency_repeats=latency_repeats, workers=workers, cascade=cascade, progress=True)
    click.echo(report.to_markdown().rstrip())
    written = [report.write(out_path)]
    if plot:
        written.append(report.plot(plot))
    click.echo("wrote " + ", ".join(map(str, written)))


@click.command("cascade")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--images", required=True, type=click.Path(), help="Held-out labelled folder to fit on: one sub-folder per class.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .safetensors file to write (may be FILE).")
@click.option("--max-drop", default=0.5, show_default=True, type=float, help="Top-1 points the cascade may lose against the best single scale.")
@click.option("--budget", default=None, type=float, help="Instead: the most accurate cascade within this fraction of the largest scale's MACs.")
@click.option("--stages", default=None, help="Scales to use, e.g. 32,16 (default: choose among all).")
@click.option("--confidence", type=click.Choice(["softmax", "margin"]), default="softmax", show_default=True,
              help="How sure a stage is of a row: the top softmax probability, or its margin over the second.")
@click.option("--max-images", default=None, type=click.IntRange(min=1), help="Fit on at most this many images.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="DataLoader worker processes.")
@clean_errors
def cascade_cmd(file, images, out, max_drop, budget, stages, confidence, max_images, batch_size, workers):
    """Fit a cascade of FILE's scales on a labelled folder and write it into the model file.

    Each image is answered at the smallest scale confident of it (sct.fit_cascade); the stages
    and thresholds go into OUT's metadata (sct.load_cascade, sct.export_onnx, sct_convert.runtime).

    \b
    sct-convert cascade model.safetensors --images val/ --max-drop 0.5 --out model.safetensors
    """
    from ..checkpoints import files as io
    from ..checkpoints import format as metadata
    from ..serving.cascade import fit_cascade
    from ..core.model import context_of
    from ..core.scales import largest_index
    from ..evaluation.data import image_dataset, loader_at, resolve_data_config, split_indices
    from .._utils.files import writable_file

    if not str(out).endswith(".safetensors"):
        raise ValueError(f"--out {out}: the cascade is written into a .safetensors model file")
    writable_file(out)

    meta = metadata.checked_metadata(file)
    model = io.load(file).eval()
    sizes = context_of(model).sizes
    config = resolve_data_config(model)
    dataset = image_dataset(images, config, what="--images")
    indices, _ = split_indices(len(dataset), 0, max_images)
    largest = sizes[largest_index(sizes)]
    loader = loader_at(dataset, indices, config, largest, batch_size, workers)
    cascade = fit_cascade(model, loader, max_drop=max_drop, budget=budget,
                          stages=parse_scales(stages, "--stages") if stages else None, confidence=confidence,
                          progress=True)
    click.echo(str(cascade.report))
    path = io.save(cascade, out, arch=meta.get("arch") or None, source=meta.get("source") or None)
    click.echo(f"wrote {path}: {len(cascade.stages)} stages, thresholds in its metadata")
