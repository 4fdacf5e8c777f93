"""Run timm's and torchvision's own model tests on plain and on converted models, side by side.

The tests are upstream's files, unchanged; ``sct_upstream_plugin`` (this folder) converts every
model they build. Each test id is run twice (plain, converted), one pytest process each, and
the table lists every test id whose outcome differs, then the counts. A converted model must
pass wherever the plain one does.

- timm: ``tests/test_models.py`` from timm's source distribution for the installed version
  (``pip download timm==<version> --no-binary :all:``: the package registry is enough).
- torchvision: ``test/test_models.py`` (or ``--vision-file test_onnx.py``: its detection tests
  export whole detectors with the TorchScript-based exporter and run them in onnxruntime; they
  need the COCO weights in torch's cache) from a checkout of pytorch/vision at the installed
  version's tag (``--vision-tests DIR``; torchvision publishes no source distribution). Expect
  files missing from DIR are first accepted from the plain models (``EXPECTTEST_ACCEPT=1``, into a
  copy), and a missing ``assets/encode_jpeg/grace_hopper_517x606.jpg`` (the "real image" of the
  R-CNN tests) is replaced by a fixed synthetic image; both are said in the output.

    python benchmarks/upstream_tests.py timm -k "test_model_backward_fx and (resnet18 or efficientnet_b0)"
    python benchmarks/upstream_tests.py torchvision --vision-tests ~/vision/test -k "test_detection_model"
    python benchmarks/upstream_tests.py torchvision --vision-tests ~/vision/test --vision-file test_onnx.py \
        -k "rcnn or retinanet or fcos or ssd" --out benchmarks/results/upstream_torchvision_onnx.md
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _host import write_atomic  # noqa: E402


def outcomes(junit: Path) -> dict:
    """test id -> passed / failed / skipped / error, from a pytest junit XML file."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        result[name] = {"failure": "failed"}.get(result[name], result[name])
    return result


def run_pytest(test_dir: Path, args: list, converted: bool, upstream: str, junit: Path, env_extra=None) -> str:
    env = {**os.environ, **(env_extra or {})}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    if converted:
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        env["SCT_UPSTREAM"] = upstream
        command[4:4] = ["-p", "sct_upstream_plugin"]
    out = subprocess.run(command, cwd=test_dir, env=env, capture_output=True, text=True)
    return out.stdout[-20000:]


def timm_tests(workdir: Path) -> Path:
    import timm

    subprocess.run([sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-binary", ":all:",
                    "--no-deps", "-q", "-d", str(workdir)], check=True)
    archive = next(workdir.glob("timm-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return next(workdir.glob("timm-*/tests"))


def vision_tests(source: Path, workdir: Path, select: list, test_file: str = "test_models.py") -> tuple:
    copy = workdir / "test"
    shutil.copytree(source, copy)
    notes = []
    image = copy / "assets" / "encode_jpeg" / "grace_hopper_517x606.jpg"
    if not image.exists():
        import torch
        from PIL import Image

        image.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        h, w = 606, 517
        ramp = 0.5 * torch.linspace(0, 1, h)[:, None, None] + 0.3 * torch.linspace(0, 1, w)[None, :, None]
        pixels = (ramp + 0.2 * torch.rand(h, w, 3, generator=g)).clamp(0, 1)
        Image.fromarray((pixels * 255).byte().numpy()).save(image, quality=90)
        notes.append("assets/encode_jpeg/grace_hopper_517x606.jpg was missing: a fixed synthetic image stands in")
    if test_file != "test_models.py":  # only test_models.py compares against expect files
        return copy, notes
    expect = copy / "expect"
    before = set(expect.glob("*.pkl")) if expect.exists() else set()
    expect.mkdir(exist_ok=True)
    run_pytest(copy, ["test_models.py", *select], False, "torchvision", workdir / "accept.xml",
               {"EXPECTTEST_ACCEPT": "1"})
    accepted = sorted(p.name for p in set(expect.glob("*.pkl")) - before)
    if accepted:
        notes.append(f"{len(accepted)} expect files were missing and were accepted from the plain models")
    return copy, notes


def table(plain: dict, converted: dict, header: list) -> str:
    lines = header + ["", "Tests whose outcome differs (skipped: CUDA tests on a host without a GPU):", "",
                      "| test | plain | converted |", "|---|---|---|"]
    differ = [t for t in sorted(plain) if plain[t] != converted.get(t)]
    lines += [f"| {t} | {plain[t]} | {converted.get(t, 'missing')} |" for t in differ] or ["| (none differ) | | |"]
    for name, res in (("plain", plain), ("converted", converted)):
        counts = {k: sum(v == k for v in res.values()) for k in ("passed", "failed", "error", "skipped")}
        lines.append(f"\n{name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    both = sum(plain[t] == "passed" and converted.get(t) == "passed" for t in plain)
    lines.append(f"\npassing plain: {sum(v == 'passed' for v in plain.values())}; of those passing converted: {both}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("upstream", choices=["timm", "torchvision"])
    p.add_argument("-k", dest="keyword", default="", help="pytest -k expression selecting the tests")
    p.add_argument("--vision-tests", type=Path, help="torchvision: a pytorch/vision checkout's test/ folder")
    p.add_argument("--vision-file", default="test_models.py", help="torchvision: the test file to run")
    p.add_argument("--out", type=Path, help="where to write the table (default results/upstream_<name>.md)")
    args = p.parse_args()
    import timm
    import torch
    import torchvision

    select = ["-k", args.keyword] if args.keyword else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.upstream == "timm":
            test_dir, notes = timm_tests(work), []  # type: list
            target = "tests/test_models.py"
            env = {"HF_HUB_OFFLINE": "1"}  # the tests build models with random weights; never wait on a download
        else:
            if args.vision_tests is None:
                p.error("torchvision needs --vision-tests DIR (pytorch/vision's test/ folder)")
            test_dir, notes = vision_tests(args.vision_tests, work, select, args.vision_file)
            target, env = args.vision_file, {}
        test_dir = test_dir.parent if args.upstream == "timm" else test_dir
        results = {}
        for converted in (False, True):
            junit = work / f"{'converted' if converted else 'plain'}.xml"
            tail = run_pytest(test_dir, [target, *select], converted, args.upstream, junit, env)
            print(tail.splitlines()[-1] if tail.strip() else "(no output)", flush=True)
            results[converted] = outcomes(junit)
            if converted:  # what the plugin converted, and what it had to hand over as it was
                notes += [line.strip() for line in tail.splitlines()
                          if line.startswith(("sct_upstream_plugin:", "  unconverted "))]
    header = [f"# {args.upstream}'s own model tests, plain vs converted",
              f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}; "
              f"`python benchmarks/upstream_tests.py {' '.join(sys.argv[1:])}`"] + [f"- {n}" for n in notes]
    text = table(results[False], results[True], header)
    out = args.out or HERE / "results" / f"upstream_{args.upstream}.md"
    write_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
