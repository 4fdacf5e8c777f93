"""Every metadata field a file of sct-convert may carry, read strictly.

A file from elsewhere (downloaded, hand-edited, damaged) is only trusted as far as its fields
parse: each field here has one reader that returns its value or raises a
:class:`~sct_convert.FileFormatError` naming the file and the field, so a loader never meets a
raw ``JSONDecodeError`` or ``int()`` error, and never silently accepts a value it then misreads.
Imports nothing but the standard library and :mod:`sct_convert.errors`: the torch-free serving
runtime reads its files with it too.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import FileFormatError

Scale = Union[int, Tuple[int, int]]

ROUTING_POLICIES = ("nearest", "error", "interpolate")
SOURCES = ("timm", "torchvision", "custom")
#: A deployment file's numbers: float32, or int8 (QDQ) with float32 at its ends.
PRECISIONS = ("float32", "int8")
INPUT_LAYOUTS = ("(N, C, H, W)", "(N, C, T, H, W)", "list of (C, H, W) images")
CONFIDENCES = ("softmax", "margin")
#: How a deployment file routes: every scale in the graph (nearest or blended), one scale, or a
#: detector core's ``size`` input.
DEPLOY_ROUTING = ("nearest", "interpolate", "fixed", "size_input")
PARTS = ("model", "core")
#: The ONNX exporters a detector file may have gone through.
EXPORTERS = ("dynamo", "torchscript")


def _bad(path: object, field: str, problem: str, value: Optional[str] = None) -> FileFormatError:
    shown = "" if value is None else f" (got {value[:80]!r})"
    return FileFormatError(f"{path}: metadata field {field!r} {problem}{shown}", path=path, field=field)


def _json(meta: Mapping[str, str], field: str, path: object) -> Any:
    try:
        return json.loads(meta[field])
    except (json.JSONDecodeError, TypeError):
        raise _bad(path, field, "is not valid JSON", meta[field]) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def scale_value(v: Any) -> Optional[Scale]:
    """A JSON scale (``224`` or ``[128, 96]``) as a scale, or ``None`` if it is not one."""
    if _is_int(v) and v > 0:
        return v
    if isinstance(v, list) and len(v) == 2 and all(_is_int(s) and s > 0 for s in v):
        return (v[0], v[1])
    return None


def size_of(scale: Scale) -> Tuple[int, int]:
    return (scale, scale) if isinstance(scale, int) else scale


def key_of(scale: Scale) -> str:
    """A scale as its branch key: ``224`` or ``128x96`` (as :func:`sct_convert.core.scales.scale_key`)."""
    h, w = size_of(scale)
    return str(h) if h == w else f"{h}x{w}"


def read_scales(meta: Mapping[str, str], path: object, field: str = "scales") -> List[Scale]:
    """The file's scales, in its order: a non-empty JSON list of positive ints or ``[h, w]``
    pairs, no size twice."""
    if field not in meta:
        raise _bad(path, field, "is missing")
    values = _json(meta, field, path)
    if not isinstance(values, list) or not values:
        raise _bad(path, field, "is not a non-empty list of scales", meta[field])
    scales = [scale_value(v) for v in values]
    if any(s is None for s in scales):
        raise _bad(path, field, "holds a value that is not a scale (a positive int or an [h, w] pair)",
                   meta[field])
    sizes = [size_of(s) for s in scales]
    if len(set(sizes)) != len(sizes):
        raise _bad(path, field, "lists a size twice", meta[field])
    return scales


def read_choice(meta: Mapping[str, str], field: str, choices: Sequence[str], path: object,
                default: Optional[str] = None) -> Optional[str]:
    """A field that must be one of ``choices`` (``default`` when absent)."""
    if field not in meta:
        return default
    if meta[field] not in choices:
        raise _bad(path, field, f"is not one of {', '.join(choices)}", meta[field])
    return meta[field]


def read_int(meta: Mapping[str, str], field: str, path: object, minimum: int = 1) -> Optional[int]:
    """A field holding a decimal integer >= ``minimum`` (``None`` when absent)."""
    if field not in meta:
        return None
    text = meta[field]
    if not (text.isascii() and text.isdigit()) or int(text) < minimum:
        raise _bad(path, field, f"is not an integer >= {minimum}", text)
    return int(text)


def read_text(meta: Mapping[str, str], field: str, path: object, limit: int = 256) -> Optional[str]:
    """A field holding one line of printable text (a name, a note), ``None`` when absent."""
    if field not in meta:
        return None
    text = meta[field]
    if not text.isprintable() or len(text) > limit:
        raise _bad(path, field, f"is not one printable line of at most {limit} characters", text)
    return text


def read_versions(meta: Mapping[str, str], path: object) -> Dict[str, str]:
    """The versions that wrote the file: a JSON object of version strings (``{}`` when absent)."""
    if "versions" not in meta:
        return {}
    versions = _json(meta, "versions", path)
    if not isinstance(versions, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.isprintable()
                                                 for k, v in versions.items()):
        raise _bad(path, "versions", "is not a JSON object of version strings", meta["versions"])
    return versions


def read_sides(meta: Mapping[str, str], path: object) -> Optional[List[int]]:
    """A detector core's sides: a non-empty JSON list of positive ints (``None`` when absent)."""
    if "sides" not in meta:
        return None
    sides = _json(meta, "sides", path)
    if not isinstance(sides, list) or not sides or not all(_is_int(s) and s > 0 for s in sides):
        raise _bad(path, "sides", "is not a non-empty list of positive ints", meta["sides"])
    return sides


def read_cascade(meta: Mapping[str, str], path: object, scales: Sequence[Scale],
                 field: str = "cascade") -> Optional[Dict[str, Any]]:
    """A cascade's spec: confidence rule, antialias flag and stages, smallest first; every
    stage's size a scale of the file, each threshold in (0, 1] but the last (``null``), MACs a
    positive int where recorded. ``None`` when the file holds no cascade."""
    if field not in meta:
        return None
    spec = _json(meta, field, path)
    if not isinstance(spec, dict):
        raise _bad(path, field, "is not a JSON object", meta[field])
    if spec.get("confidence") not in CONFIDENCES:
        raise _bad(path, field, f"has a confidence that is not one of {', '.join(CONFIDENCES)}", meta[field])
    if not isinstance(spec.get("antialias", True), bool):
        raise _bad(path, field, "has an antialias that is not true or false", meta[field])
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise _bad(path, field, "has no stages", meta[field])
    known = {size_of(s) for s in scales}
    for i, stage in enumerate(stages):
        size = scale_value(stage.get("size")) if isinstance(stage, dict) else None
        if size is None or not isinstance(stage.get("size"), list):
            raise _bad(path, field, f"stage {i} has no [h, w] size", meta[field])
        if size_of(size) not in known:
            raise _bad(path, field, f"stage {i} is at {key_of(size)}, which is not a scale of the file "
                       f"({', '.join(key_of(s) for s in scales)})", meta[field])
        threshold = stage.get("threshold")
        last = i == len(stages) - 1
        if last and threshold is not None:
            raise _bad(path, field, "has a threshold on its last stage (which answers every row left)", meta[field])
        if not last and not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                             and math.isfinite(threshold) and 0 < threshold <= 1):
            raise _bad(path, field, f"stage {i} has a threshold outside (0, 1]", meta[field])
        if "macs" in stage and not (_is_int(stage["macs"]) and stage["macs"] > 0):
            raise _bad(path, field, f"stage {i} has MACs that are not a positive int", meta[field])
    return spec


def read_error(meta: Mapping[str, str], field: str, path: object) -> Optional[float]:
    """A measured error the export recorded: a finite number >= 0 (``None`` when absent)."""
    if field not in meta:
        return None
    try:
        value = float(meta[field])
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise _bad(path, field, "is not a number >= 0", meta[field])
    return value


def read_names(meta: Mapping[str, str], field: str, path: object) -> Optional[List[str]]:
    """A comma-separated list of output names (``None`` when absent)."""
    if field not in meta:
        return None
    names = meta[field].split(",")
    if not all(n and n.isprintable() and len(n) <= 128 for n in names):
        raise _bad(path, field, "is not a comma-separated list of names", meta[field])
    return names


def read_transform_sizes(meta: Mapping[str, str], path: object) -> Optional[Dict[str, Dict[str, Any]]]:
    """A detector file's transform settings per scale: a JSON object of objects (``None`` when absent)."""
    if "transform_sizes" not in meta:
        return None
    sizes = _json(meta, "transform_sizes", path)
    if not isinstance(sizes, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in sizes.items()):
        raise _bad(path, "transform_sizes", "is not a JSON object of per-scale settings", meta["transform_sizes"])
    return sizes


def read_json_object(meta: Mapping[str, str], field: str, path: object) -> Optional[Dict[str, Any]]:
    """A field holding a JSON object (``None`` when absent)."""
    if field not in meta:
        return None
    value = _json(meta, field, path)
    if not isinstance(value, dict):
        raise _bad(path, field, "is not a JSON object", meta[field])
    return value


def read_int8_report(meta: Mapping[str, str], path: object) -> Optional[Dict[str, Any]]:
    """An int8 file's accuracy report: per scale, top-1 in float and int8 (numbers)."""
    report = read_json_object(meta, "int8_report", path)
    if report is not None and not all(
            isinstance(v, dict) and all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in v.values())
            for v in report.values()):
        raise _bad(path, "int8_report", "is not a JSON object of per-scale numbers", meta["int8_report"])
    return report


#: What each field of a combined checkpoint (``sct.save``) may hold; ``scales`` is required.
CHECKPOINT_FIELDS: Dict[str, Callable[[Mapping[str, str], object], Any]] = {
    "scales": read_scales,
    "unknown_scale": lambda m, p: read_choice(m, "unknown_scale", ROUTING_POLICIES, p, "nearest"),
    "scale_specific_bn": lambda m, p: read_choice(m, "scale_specific_bn", ("0", "1"), p, "1"),
    "arch": lambda m, p: read_text(m, "arch", p),
    "source": lambda m, p: read_choice(m, "source", SOURCES + ("",), p),
    "num_classes": lambda m, p: read_int(m, "num_classes", p),
    "in_chans": lambda m, p: read_int(m, "in_chans", p),
    "aux_loss": lambda m, p: read_choice(m, "aux_loss", ("0", "1"), p),
    "input_layout": lambda m, p: read_choice(m, "input_layout", INPUT_LAYOUTS, p),
    "layers": lambda m, p: read_int(m, "layers", p, minimum=0),
    "versions": read_versions,
    "cascade": lambda m, p: read_cascade(m, p, read_scales(m, p)),
}

#: What each field of an ONNX or ``.pt2`` file (``sct.export_onnx`` / ``export_program``) may hold.
DEPLOY_FIELDS: Dict[str, Callable[[Mapping[str, str], object], Any]] = {
    **{k: CHECKPOINT_FIELDS[k] for k in ("scales", "arch", "source", "num_classes", "in_chans", "aux_loss",
                                         "versions", "cascade")},
    "input_layout": lambda m, p: read_text(m, "input_layout", p),  # detector files describe theirs
    "routing": lambda m, p: read_choice(m, "routing", DEPLOY_ROUTING, p),
    "scale": lambda m, p: _read_scale_of_file(m, p),
    "input_name": lambda m, p: read_text(m, "input_name", p),
    "opset": lambda m, p: read_int(m, "opset", p),
    "part": lambda m, p: read_choice(m, "part", PARTS, p),
    "sides": read_sides,
    "transform_sizes": read_transform_sizes,
    # what a detector file records of its export and its check (shown by sct-convert inspect)
    "exporter": lambda m, p: read_choice(m, "exporter", EXPORTERS, p),
    "outputs": lambda m, p: read_names(m, "outputs", p),
    "max_error": lambda m, p: read_error(m, "max_error", p),
    "max_core_error": lambda m, p: read_error(m, "max_core_error", p),
    "checked_detections": lambda m, p: read_int(m, "checked_detections", p, minimum=0),
    "routing_note": lambda m, p: read_text(m, "routing_note", p, limit=1024),
    "precision": lambda m, p: read_choice(m, "precision", PRECISIONS, p),
    "int8": lambda m, p: read_json_object(m, "int8", p),
    "int8_report": read_int8_report,
    "checked_in": lambda m, p: read_text(m, "checked_in", p),
}


def _read_scale_of_file(meta: Mapping[str, str], path: object) -> Optional[str]:
    """A per-scale file's scale: a branch key that is one of the file's scales."""
    if "scale" not in meta:
        return None
    keys = [key_of(s) for s in read_scales(meta, path)]
    if meta["scale"] not in keys:
        raise _bad(path, "scale", f"is not one of the file's scales ({', '.join(keys)})", meta["scale"])
    return meta["scale"]


def check_fields(meta: Mapping[str, str], path: object, fields: Mapping[str, Callable]) -> Dict[str, Any]:
    """Read every field of ``fields`` that ``meta`` holds (and the required ``scales``); the
    parsed values, or the first field's :class:`~sct_convert.FileFormatError`."""
    return {name: read(meta, path) for name, read in fields.items() if name in meta or name == "scales"}
