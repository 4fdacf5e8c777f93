"""Write the references: docs/api.md from the docstrings of every name in ``sct_convert.__all__``,
docs/cli.md from the ``--help`` of every ``sct-convert`` command.

    python docs/gen_reference.py            # rewrite both
    python docs/gen_reference.py --check    # exit 1 if either is not what the code says

``tests/test_api.py`` compares both with the code, so the references cannot drift from it.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import List

import sct_convert as sct

OUT = Path(__file__).with_name("api.md")
CLI_OUT = Path(__file__).with_name("cli.md")
SECTIONS = {
    "Convert and route": ["convert", "scale", "route", "scales_of", "context_of", "extract", "original_class",
                          "find_batch_norms", "is_batch_norm", "scale_specific_layers", "resize_to",
                          "ConversionError", "FROZEN_BATCH_NORM_TYPES"],
    "Train": ["SCTLoss", "ScaleOutputs", "train_step", "StepResult", "set_sampling", "sampling_scales",
              "random_scale_subset"],
    "Calibrate and change scales": ["calibrate", "add_scale", "remove_scale"],
    "Evaluate per scale": ["evaluate", "EvaluationReport"],
    "Save, load and export": ["save", "load", "export", "save_per_scale", "load_plain", "load_weights",
                              "export_onnx", "export_program"],
    "Serve a cascade of scales": ["Cascade", "fit_cascade", "load_cascade", "CascadeResult", "CascadeReport"],
    "Deploy a detector's core": ["detector_core", "detector_preprocess", "detector_postprocess", "DetectorBatch",
                                 "DetectorCore"],
    "Building blocks": ["ScaleSpecificBatchNorm", "ScaleContext"],
    "Modules": ["diagnostics", "zoo"],
}
GOOGLE_SECTIONS = ("Args", "Returns", "Attributes", "Raises", "Yields")


def _inline(text: str) -> str:
    """reST roles and literals to Markdown: :func:`x` -> `x`, ``x`` -> `x`."""
    text = re.sub(r":(?:func|class|mod|data|meth|attr):`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _render_doc(doc: str) -> List[str]:
    out: List[str] = []
    section = None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.rstrip(":") in GOOGLE_SECTIONS and stripped.endswith(":") and not line.startswith(" "):
            section = stripped[:-1]
            out += ["", f"**{section}:**", ""]
            continue
        if section and line.startswith("    "):
            body = line[4:]
            item = re.match(r"^(\w+)( \([^)]*\))?: (.*)$", body) if section in ("Args", "Attributes") else None
            if item and not body.startswith(" "):
                out.append(f"- `{item.group(1)}`: {_inline(item.group(3))}")
            else:
                out.append(("  " if section in ("Args", "Attributes") else "") + _inline(body.strip()))
            continue
        if stripped:
            section = None if not line.startswith(" ") else section
        out.append(_inline(line))
    return out


def _signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"sct.{name}"
    params = []
    for p in sig.parameters.values():
        text = p.name if p.kind is not p.VAR_POSITIONAL else f"*{p.name}"
        if p.kind is p.VAR_KEYWORD:
            text = f"**{p.name}"
        if p.default is not p.empty:
            text += f"={p.default!r}"
        params.append(text)
    kw_only = [i for i, p in enumerate(sig.parameters.values()) if p.kind is p.KEYWORD_ONLY]
    if kw_only and not any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        params.insert(kw_only[0], "*")
    return f"sct.{name}({', '.join(params)})"


def _entry(name: str, obj, level: str = "###") -> List[str]:
    if inspect.ismodule(obj):
        lines = [f"{level} `sct.{name}`", "", *_render_doc(inspect.getdoc(obj) or ""), ""]
        for fname, fn in sorted(vars(obj).items()):
            if fname.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != obj.__name__:
                continue
            lines += _entry(f"{name}.{fname}", fn, "####")
        return lines
    if inspect.isclass(obj) or callable(obj):
        head = f"{level} `{_signature(name, obj)}`"
    else:
        head = f"{level} `sct.{name}`"
        obj_doc = {"FROZEN_BATCH_NORM_TYPES": "The frozen batch-norm classes `convert` branches as well "
                   "(torchvision's `FrozenBatchNorm2d`, timm's `FrozenBatchNorm2d` and `FrozenBatchNormAct2d`)."}
        return [head, "", obj_doc.get(name, ""), ""]
    return [head, "", *_render_doc(inspect.getdoc(obj) or ""), ""]


def render() -> str:
    listed = [n for names in SECTIONS.values() for n in names]
    missing = sorted(set(sct.__all__) - set(listed))
    if missing or len(listed) != len(set(listed)):
        raise SystemExit(f"docs/gen_reference.py: place these public names in SECTIONS: {missing}")
    lines = ["# API reference", "",
             "Generated by `python docs/gen_reference.py` from the docstrings of every name in `sct_convert.__all__`;",
             "`import sct_convert as sct`.", ""]
    for title in SECTIONS:
        lines += [f"- [{title}](#{title.lower().replace(' ', '-').replace(',', '')})"]
    lines.append("")
    for title, names in SECTIONS.items():
        lines += [f"## {title}", ""]
        for name in names:
            lines += _entry(name, getattr(sct, name))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def render_cli() -> str:
    """Every command's ``--help``, as a terminal would print it (80 columns)."""
    from click.testing import CliRunner

    from sct_convert.cli import cli

    def help_of(args: List[str]) -> str:
        result = CliRunner().invoke(cli, args + ["--help"], prog_name="sct-convert", terminal_width=80)
        return result.output.rstrip()

    lines = ["# CLI reference", "",
             "Generated by `python docs/gen_reference.py` from `sct-convert --help` and each command's",
             "`--help`. Every error is one `Error: ...` line on stderr with exit status 1, never a",
             "traceback, and leaves existing files as they were (outputs are written to a temporary",
             "file and renamed); a warning is one `Warning: ...` line.", "",
             "```text", help_of([]), "```", ""]
    for name in cli.commands:
        lines += [f"## `sct-convert {name}`", "", "```text", help_of([name]), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a reference is out of date")
    args = p.parse_args()
    stale = False
    for path, text in ((OUT, render()), (CLI_OUT, render_cli())):
        if not args.check:
            path.write_text(text)
            print(f"wrote {path}")
        elif not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run python docs/gen_reference.py", file=sys.stderr)
            stale = True
    sys.exit(1 if stale else 0)


if __name__ == "__main__":
    main()
