"""pytest plugin: run an upstream project's own model tests on converted models.

Loaded with ``-p sct_upstream_plugin`` (``benchmarks/`` on ``PYTHONPATH``), it wraps the model
factories the upstream tests call, so every model a test builds is converted with
``sct.convert`` before the test sees it; the tests themselves are not touched:

- torchvision (``SCT_UPSTREAM=torchvision``): ``torchvision.models.get_model_builder`` and each
  builder where a ``torchvision.models`` module exposes it (``test_onnx.py`` calls them directly); a
  detection model's scales are its transform's size (``fixed_size`` for SSD, else ``min_size``)
  and ~0.75 of it, any other model's are 224 and 160;
- timm (``SCT_UPSTREAM=timm``): ``timm.create_model``; scales are the model's
  ``pretrained_cfg`` input size and ~0.75 of it.

A model that ``convert`` refuses (no batch norm, say) is handed over unconverted and counted in
the session's summary line, so a pass is never claimed for a model that was not converted.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import warnings

import sct_convert as sct
from sct_convert.core.model import is_converted

CONVERTED: list = []
_BUILDING = threading.local()
UNCONVERTED: list = []
_BUILDING = threading.local()


def _smaller(side: int) -> int:
    return max(8, int(round(side * 0.75 / 8)) * 8)


def _convert(model, name: str, side: int):
    if is_converted(model):  # a builder wrapped twice (get_model_builder and the module attribute)
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            converted = sct.convert(model, [side, _smaller(side)])
    except (sct.ConversionError, ValueError) as e:
        UNCONVERTED.append(f"{name}: {str(e).splitlines()[0]}")
        return model
    CONVERTED.append(name)
    return converted


def _torchvision_side(model) -> int:
    from sct_convert.core.resizer import find_resizer, transform_size

    resizer = find_resizer(model)
    return transform_size(model.get_submodule(resizer))[0] if resizer else 224


def _patch_torchvision() -> None:
    import torchvision.models

    original = torchvision.models.get_model_builder

    def get_model_builder(name: str):
        builder = original(name)

        @functools.wraps(builder)
        def build(*args, **kwargs):
            # a detector's builder calls its backbone's builder: convert only the outermost model
            depth = getattr(_BUILDING, "depth", 0)
            _BUILDING.depth = depth + 1
            try:
                model = builder(*args, **kwargs)
            finally:
                _BUILDING.depth = depth
            return model if depth else _convert(model, name, _torchvision_side(model))

        return build

    torchvision.models.get_model_builder = get_model_builder
    # test_onnx.py and others call the builders directly (models.detection.faster_rcnn.
    # fasterrcnn_resnet50_fpn(...)): wrap each one where a torchvision.models module exposes it.
    for name in torchvision.models.list_models():
        builder = original(name)
        wrapped = get_model_builder(name)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("torchvision.models") and \
                    getattr(module, name, None) is builder:
                setattr(module, name, wrapped)


def _patch_timm() -> None:
    import timm
    import timm.models

    original = timm.create_model

    @functools.wraps(original)
    def create_model(name, *args, **kwargs):
        model = original(name, *args, **kwargs)
        size = kwargs.get("img_size") or getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
        return _convert(model, name, int(size if isinstance(size, int) else size[-1]))

    timm.create_model = create_model
    timm.models.create_model = create_model


def pytest_configure(config) -> None:
    which = os.environ.get("SCT_UPSTREAM", "")
    if which == "torchvision":
        _patch_torchvision()
    elif which == "timm":
        _patch_timm()
    else:
        raise RuntimeError("set SCT_UPSTREAM=torchvision or SCT_UPSTREAM=timm for sct_upstream_plugin")


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(f"sct_upstream_plugin: {len(CONVERTED)} models converted, "
                                f"{len(UNCONVERTED)} handed over unconverted")
    for line in sorted(set(UNCONVERTED)):
        terminalreporter.write_line(f"  unconverted {line}")
