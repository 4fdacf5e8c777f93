"""Serve a cascade from its ONNX file with onnxruntime and NumPy only (no torch).

``sct.export_onnx(cascade, "model.onnx")`` writes the model's switchable file with the cascade
(stages, thresholds, sizes, MACs, confidence rule) in its metadata. :class:`CascadeSession`
opens it and serves exactly what the eager :class:`sct_convert.Cascade` serves: each stage
resizes the original input to its size (bilinear, ``align_corners=False``, antialiased when
shrinking, as torch's ``F.interpolate`` and SCT sampling do), the file routes that size to its
branch, and rows whose confidence reaches the stage's threshold are answered there. A session
holds no per-call state: calls from several threads each get their own answer.

    from sct_convert.runtime import CascadeSession
    session = CascadeSession("model.onnx")
    result = session.run(images)        # images: float32 (N, C, H, W), any size
    result.logits, result.scales, result.macs

Needs ``onnxruntime`` and ``numpy`` only (``pip install onnxruntime numpy``).
"""
from __future__ import annotations

import functools
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .errors import FileFormatError
from .metadata_fields import read_cascade, read_scales


class RuntimeResult(NamedTuple):
    """What :meth:`CascadeSession.run` returns (NumPy arrays, as :class:`sct_convert.CascadeResult`).

    Attributes:
        logits: ``(N, classes)`` float32, each row from the stage that answered it.
        scales: ``(N,)`` int64, the side (height) of the scale that answered each row.
        macs: ``(N,)`` int64, multiply-accumulates spent on each row.
    """

    logits: np.ndarray
    scales: np.ndarray
    macs: np.ndarray


def confidence_of(logits: np.ndarray, how: str) -> np.ndarray:
    """Per row of ``logits`` (N, classes): the largest softmax probability (``how="softmax"``), or
    the gap between the two largest (``"margin"``), in float64. The one home of the cascade's
    confidence rule: :func:`sct_convert.serving.cascade.confidence_of` calls it too."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top = -np.sort(-p, axis=1)[:, :2]
    if how == "softmax" or top.shape[1] == 1:
        return top[:, 0]
    return top[:, 0] - top[:, 1]


@functools.lru_cache(maxsize=64)
def _weights(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """The ``(size_out, size_in)`` matrix of torch's bilinear resize along one axis
    (``align_corners=False``; with ``antialias``, its triangle filter, widened by the scale when
    shrinking, as torch's ``_upsample_bilinear2d_aa`` and PIL compute it). Cached, read-only:
    a server resizes to the same few sizes on every call."""
    w = _weights_uncached(size_in, size_out, antialias)
    w.setflags(write=False)
    return w


def _weights_uncached(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    scale = size_in / size_out
    w = np.zeros((size_out, size_in), dtype=np.float64)
    if antialias:
        support, inv = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
        for i in range(size_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), size_in)
            taps = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * inv))
            w[i, lo:hi] = taps / taps.sum()
        return w
    for i in range(size_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        t = src - i0
        w[i, i0] += 1.0 - t
        w[i, i1] += t
    return w


def resize(x: np.ndarray, hw: Sequence[int], antialias: bool = True) -> np.ndarray:
    """Resize the last two dims of ``x`` to ``hw`` as ``sct.resize_to`` does (bilinear,
    ``align_corners=False``, antialiased when shrinking); ``x`` itself when already ``hw``."""
    h, w = int(hw[0]), int(hw[1])
    if x.shape[-2:] == (h, w):
        return x
    down = h < x.shape[-2] or w < x.shape[-1]
    rows = _weights(x.shape[-2], h, antialias and down)
    cols = _weights(x.shape[-1], w, antialias and down)
    out = np.matmul(np.matmul(rows, x.astype(np.float64)), cols.T)
    return out.astype(x.dtype, copy=False)


def open_session(path: str, *, providers: Sequence[str] = ("CPUExecutionProvider",), options: Optional[Any] = None,
                 threads: Optional[int] = None, quiet: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` over ``path``: the one place sct-convert opens one.

    Args:
        path: the ONNX file.
        providers: onnxruntime execution providers (default: the CPU).
        options: an ``onnxruntime.SessionOptions`` to start from (a new one by default).
        threads: intra-op threads (default: onnxruntime's choice, every core).
        quiet: no onnxruntime log output (for a caller that reports the failure itself).

    Returns:
        The session.
    """
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if quiet:
        options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=list(providers))


class CascadeSession:
    """An onnxruntime session over a cascade's ONNX file (``sct.export_onnx(cascade, path)``).

    Args:
        path: the ONNX file; its metadata must hold a cascade.
        providers: onnxruntime execution providers.
        options: an ``onnxruntime.SessionOptions`` (threads, optimisation level).
    """

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",),
                 options: Optional[Any] = None) -> None:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        unloadable = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile,
                      ort_errors.InvalidArgument, ort_errors.NotImplemented, OSError)
        try:
            self.session = open_session(path, providers=providers, options=options)
        except unloadable as e:
            raise FileFormatError(f"{path} is not an ONNX file onnxruntime can load: "
                                  f"{' '.join(str(e).split())[:200]}", path=path) from None
        meta = {k[len("sct_convert."):]: v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                if k.startswith("sct_convert.")}
        if "cascade" not in meta:
            raise FileFormatError(f"{path} holds no cascade: export one with sct.export_onnx(cascade, path)",
                                  path=path, field="cascade")
        spec = read_cascade(meta, path, read_scales(meta, path))
        self.confidence: str = spec["confidence"]
        self.antialias: bool = bool(spec["antialias"])
        self.stages: List[Tuple[Tuple[int, int], Optional[float], int]] = [
            ((int(st["size"][0]), int(st["size"][1])), st["threshold"], int(st["macs"])) for st in spec["stages"]]
        self.input_name: str = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x).logits

    def run(self, x: np.ndarray) -> RuntimeResult:
        """Serve a batch ``(N, C, H, W)`` (or clips ``(N, C, T, H, W)``) of any size: see the module doc."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim not in (4, 5):
            raise ValueError(f"a cascade takes a batch (N, C, H, W) or clips (N, C, T, H, W), got shape {x.shape}")
        n = x.shape[0]
        rows = np.arange(n)
        logits: Optional[np.ndarray] = None
        answered = np.zeros(n, dtype=np.int64)
        macs = np.zeros(n, dtype=np.int64)
        for hw, threshold, cost in self.stages:
            batch = resize(x[rows] if len(rows) < n else x, hw, self.antialias)
            out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
            if logits is None:
                logits = np.empty((n, out.shape[1]), dtype=out.dtype)
            macs[rows] += cost
            keep = (np.ones(len(rows), dtype=bool) if threshold is None
                    else confidence_of(out, self.confidence) >= threshold)
            logits[rows[keep]] = out[keep]
            answered[rows[keep]] = hw[0]
            rows = rows[~keep]
            if len(rows) == 0:
                break
        return RuntimeResult(logits, answered, macs)


__all__ = ["CascadeSession", "RuntimeResult", "resize"]
