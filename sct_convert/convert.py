"""The conversion pass: find every place a batch norm is applied, give it one branch per scale.

Discovery traces the model with torch.fx (batch norms and timm's no-trace modules as leaves)
to audit every call site, including functional ``F.batch_norm`` on module parameters. The
rewrite then swaps modules in place on the user's own module tree, by identity, so the model
keeps its class, attributes, methods and training-mode control flow; no GraphModule is
returned. The model's class becomes a generated subclass (same name) whose ``forward`` routes
each call by the image's size or samples every scale in train mode; the model's entry layer
(normally its first S-BN, found by a probe forward at every scale) routes calls that bypass
that forward.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .bn import ScaleSpecificBatchNorm, is_batch_norm
from .context import CONTEXT_ATTR, HW, Scale, ScaleContext, normalize_scale, pinned, scale_key
from .routing import EntryRouter, ScaleBlend, route_size
from .sampling import converted_forward, image_parameter, scaled_type
from .scripting import ScriptedRouter

_FUNCTIONAL_BATCH_NORMS = {F.batch_norm, torch.batch_norm}


class ConversionError(ValueError):
    """A model that cannot be converted; the message names the layer or scale and the fix."""


@dataclass
class ConversionReport:
    """What :func:`convert` found; kept on the model's context for ``inspect``-style summaries."""

    converted: List[str] = field(default_factory=list)  # qualified names of the S-BN layers
    call_sites: Dict[str, int] = field(default_factory=dict)  # BN name -> calls per forward
    inside_leaf_modules: List[str] = field(default_factory=list)
    functional_owners: List[str] = field(default_factory=list)
    traced: bool = True
    trace_error: Optional[str] = None
    entry: str = ""


# ---------------------------------------------------------------------------------------------
# Discovery


def _timm_notrace() -> Tuple[Tuple[type, ...], Tuple]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


class BatchNormTracer(torch.fx.Tracer):
    """torch.fx tracer whose leaves are torch.nn modules, every batch norm and timm's leaves."""

    def __init__(self) -> None:
        leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            is_batch_norm(m)
            or isinstance(m, self._leaf_types)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _uses_functional_batch_norm(cls: type) -> bool:
    if cls.__module__.startswith("torch.nn"):
        return False
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return re.search(r"\bbatch_norm\s*\(", source) is not None


def _audit_graph(model: nn.Module, graph: torch.fx.Graph, report: ConversionReport) -> List[str]:
    """Record BN call sites from the graph; return owners of functional batch norms."""
    modules = dict(model.named_modules())
    owners: Dict[str, Set[str]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if is_batch_norm(module):
                report.call_sites[node.target] = report.call_sites.get(node.target, 0) + 1
            else:
                for name, sub in module.named_modules():
                    if name and is_batch_norm(sub):
                        report.inside_leaf_modules.append(f"{node.target}.{name}")
        elif node.op == "call_function" and node.target in _FUNCTIONAL_BATCH_NORMS:
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else ""
            attrs = {a.target for a in node.all_input_nodes if a.op == "get_attr"}
            if not attrs:
                continue  # batch statistics only, no module state: nothing scale-specific
            for attr in attrs:
                owner = attr.rpartition(".")[0]
                if owner != where:
                    raise ConversionError(
                        f"batch_norm called in '{where or type(model).__name__}' uses state "
                        f"'{attr}' of another module; S-BN can only branch a module whose own "
                        "forward applies it. Wrap that state in an nn.BatchNorm layer."
                    )
                owners.setdefault(owner, set()).add(attr.rpartition(".")[2])
    for owner, used in owners.items():
        module = modules[owner]
        state = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        if owner == "" or state - used:
            raise ConversionError(
                f"module '{owner or type(model).__name__}' ({type(module).__name__}) applies "
                f"F.batch_norm to its parameters but also holds {sorted(state - used) or 'the model'}; "
                "only a module that holds nothing but the batch-norm state can become "
                "scale-specific. Move the batch norm into its own nn.BatchNorm layer."
            )
    return sorted(owners)


def _audit_module_tree(model: nn.Module) -> None:
    """Without a graph, the module tree is complete unless some non-BN module normalizes itself."""
    for name, module in model.named_modules():
        if is_batch_norm(module):
            continue
        own_buffers = {n for n, _ in module.named_buffers(recurse=False)}
        if {"running_mean", "running_var"} & own_buffers or _uses_functional_batch_norm(
            type(module)
        ):
            raise ConversionError(
                f"module '{name}' ({type(module).__name__}) may apply batch norm functionally, "
                "and torch.fx could not trace the model to check its call sites; wrap the batch "
                "norm in an nn.BatchNorm layer or make the model traceable"
            )


def find_batch_norms(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], ConversionReport]:
    """Every batch-norm layer ``convert`` would branch, and the audit of the rest.

    Args:
        model: an unconverted model.

    Returns:
        ``(layers, report)``: ``(first qualified name, module)`` for each batch norm, and a
        report of the norm layers found and what ``convert`` will do with each. Raises
        :class:`ConversionError` naming the layer when some batch norm cannot be branched.
    """
    report = ConversionReport()
    try:
        graph = BatchNormTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure falls back to the module tree
        report.traced = False
        report.trace_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _audit_module_tree(model)
    else:
        report.functional_owners = _audit_graph(model, graph, report)
    functional = set(report.functional_owners)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if name and (is_batch_norm(m) or name in functional)
    ]
    # A batch norm nested in another (timm's BatchNormAct2d holding a BN-like act) is branched
    # with its parent, not on its own.
    parents = [n for n, _ in found]
    found = [(n, m) for n, m in found if not any(n.startswith(p + ".") for p in parents)]
    for name, module in found:
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ConversionError(
                f"batch norm '{name}' is lazy and not initialized yet; run one forward pass "
                "before converting"
            )
    return found, report


# ---------------------------------------------------------------------------------------------
# Probe: can the model run at each scale, and which module sees the input first?


def stem_conv(model: nn.Module) -> Optional[nn.Module]:
    """The conv the image reaches first: timm's ``pretrained_cfg["first_conv"]``, else the first conv."""
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if isinstance(name, str):
        try:
            named = model.get_submodule(name)
        except AttributeError:
            named = None
        if isinstance(named, nn.modules.conv._ConvNd):
            return named
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def _channel_candidates(model: nn.Module, in_chans: Optional[int]) -> List[int]:
    """Image channel counts to probe with, most likely first.

    The stem conv's own ``in_channels`` comes before timm's ``pretrained_cfg["input_size"]``,
    which keeps saying 3 for a model created with ``in_chans=1``; the config and 3 follow for
    stems that reshape the image before their first conv (space-to-depth: 3 -> 48).
    """
    if in_chans is not None:
        return [in_chans]
    conv = stem_conv(model)
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    candidates = [conv.in_channels if conv is not None else None, int(size[0]) if size else None, 3]
    return list(dict.fromkeys(c for c in candidates if c is not None))


def _probe_leads(model: nn.Module, in_chans: Optional[int],
                 example_input: Optional[torch.Tensor]) -> List[Tuple[int, ...]]:
    """Leading dims of probe inputs to try, (N, C) or (N, C, T) for 3-d convs; spatial dims appended."""
    if example_input is not None:
        return [tuple(example_input.shape[:-2])]
    volumetric = isinstance(stem_conv(model), (nn.Conv3d, nn.ConvTranspose3d))
    return [(1, c, 4) if volumetric else (1, c) for c in _channel_candidates(model, in_chans)]


def _first_lead_that_runs(model, leads, probe):
    """``(lead, probe(lead))`` for the first lead the model accepts; else the first lead's error."""
    first_error = None
    for lead in leads:
        try:
            return lead, probe(lead)
        except ConversionError as e:
            first_error = first_error or e
    raise first_error


def _describe_failure(e: BaseException) -> str:
    """``Type: first line of message (at file.py:line in fn)`` for the innermost frame."""
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = ""
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f" (at {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name})"
    return f"{type(e).__name__}: {msg}{where}" if msg else f"{type(e).__name__}{where}"


def _out_of_memory(e: BaseException) -> bool:
    """The host ran out of memory: says nothing about whether the model accepts a size."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


@contextlib.contextmanager
def run_mode(model: nn.Module, training: bool = False) -> Iterator[None]:
    """Eval (or with ``training``, train) mode inside the block; every module's flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _probe_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where and in what dtype a probe input goes: the model's first floating-point parameter's."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


@contextlib.contextmanager
def _rng_kept(model: nn.Module) -> Iterator[None]:
    """Probe inputs are random; the caller's RNG streams (CPU and the model's GPU) stay as they were."""
    device, _ = _probe_device_dtype(model)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Every buffer (BN statistics, counters) holds its old value after the block."""
    saved = [(m, k, b, b.detach().clone()) for m in model.modules()
             for k, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, k, b, copy_of_b in saved:
                m._buffers[k] = b
                b.copy_(copy_of_b)


def _training_failure(model: nn.Module, sizes: Sequence[HW], scales: Sequence[Scale],
                      lead: Tuple[int, ...], index: Optional[int] = None) -> Optional[str]:
    """A warning when the train-mode forward fails at scale ``index`` but runs at the largest.

    The eval probe cannot see train-only parts (torchvision Inception-v3's aux head needs a
    larger input than the main path). One no-grad, batch-2 forward at scale ``index`` (by
    default the smallest) finds them; the model's buffers and mode flags are left as they
    were. A failure at the largest other scale too is not about size (say, a model that
    wants targets in train mode), so it says nothing.
    """
    syncing = torch.distributed.is_available() and torch.distributed.is_initialized() and any(
        isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if len(sizes) < 2 or syncing:  # a train-mode SyncBN forward would start collectives
        return None
    device, dtype = _probe_device_dtype(model)
    pixels = lambda i: sizes[i][0] * sizes[i][1]  # noqa: E731
    probed = min(range(len(sizes)), key=pixels) if index is None else index
    reference = max((i for i in range(len(sizes)) if i != probed), key=pixels)
    train_lead = (max(2, lead[0]),) + tuple(lead[1:])  # train-mode BN needs two samples

    def failure(i: int) -> Optional[BaseException]:
        x = torch.randn(*train_lead, *sizes[i], device=device, dtype=dtype)
        try:
            model(x)
        except Exception as e:  # noqa: BLE001 - reported as a warning below
            return e
        return None

    with run_mode(model, training=True), _buffers_kept(model), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model's own train-mode warnings are not ours
        failed = failure(probed)
        if failed is None or _out_of_memory(failed) or failure(reference) is not None:
            return None
    shape = "x".join(map(str, (*train_lead, *sizes[probed])))
    return (
        f"scale {scales[probed]!r}: the model runs at this size in eval mode, but its "
        f"train-mode forward fails (input {shape}): {_describe_failure(failed)}; SCT training "
        "with this scale will fail: drop the scale, or switch off the train-only part that "
        "fails (for torchvision Inception-v3, aux_logits=False)"
    )


def _probe_entry(
    model: nn.Module, sizes: Sequence[HW], scales: Sequence[Scale], lead: Tuple[int, ...],
    batch_norms: Set[int], probed_sizes: Optional[Dict[str, Optional[List[HW]]]] = None,
    need_entry: bool = True,
) -> Tuple[str, List[HW]]:
    """Run the model at every scale; return the entry module's name and its input size per scale.

    ``probed_sizes``, if given, receives each batch norm's input size per scale (``None`` where
    it is called more than once per forward or sees the same size at two scales). Without
    ``need_entry`` the model only has to run: ``("", [])`` when no layer can route.
    """
    probed_sizes = {} if probed_sizes is None else probed_sizes
    device, dtype = _probe_device_dtype(model)
    seen: List[Dict[str, List[HW]]] = []
    order: List[str] = []
    state = {"bn_called": False, "record": None}

    def hook_for(name: str, module: nn.Module):
        leaf_like = id(module) in batch_norms or not any(True for _ in module.children())

        def hook(_module: nn.Module, args: tuple) -> None:
            record = state["record"]
            x = args[0] if args else None
            if not leaf_like or not isinstance(x, torch.Tensor) or x.dim() < 3:
                return
            record.setdefault(name, []).append((int(x.shape[-2]), int(x.shape[-1])))
            if record is seen[0] and not state["bn_called"] and name not in order:
                order.append(name)
            if id(_module) in batch_norms:
                state["bn_called"] = True

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(n, m)) for n, m in model.named_modules() if n
    ]
    try:
        with run_mode(model), torch.no_grad():
            for scale, (h, w) in zip(scales, sizes):
                state["record"] = {}
                state["bn_called"] = False
                seen.append(state["record"])
                x = torch.randn(*lead, h, w, device=device, dtype=dtype)
                try:
                    model(x)
                except Exception as e:  # noqa: BLE001 - reported with the scale that failed
                    if _out_of_memory(e):
                        raise  # not the architecture's verdict on this scale
                    shape = "x".join(map(str, x.shape))
                    raise ConversionError(
                        f"model cannot run at scale {scale!r} (input {shape}): "
                        f"{_describe_failure(e)}; drop that scale or pick sizes the "
                        "architecture accepts (fixed-size models need their native size)"
                    ) from e
    finally:
        for handle in handles:
            handle.remove()
    def per_scale_sizes(name: str) -> Optional[List[HW]]:  # one call per forward, distinct sizes
        calls = [record.get(name, []) for record in seen]
        if any(len(c) != 1 for c in calls):
            return None  # called more than once per forward: it would re-route mid-forward
        sizes = [c[0] for c in calls]
        return sizes if len(set(sizes)) == len(sizes) else None

    bn_names = {n for n, m in model.named_modules() if id(m) in batch_norms}
    # The first batch norm is the natural entry: its dispatch is already a traced leaf call.
    first_bn = next((n for n in order if id(model.get_submodule(n)) in batch_norms), None)
    for name in ([first_bn] if first_bn else []) + order:
        sizes = per_scale_sizes(name)
        if sizes is not None:
            probed_sizes.update({n: per_scale_sizes(n) for n in seen[0] if n in bn_names})
            return name, sizes
    if not need_entry:
        return "", []
    raise ConversionError(
        "cannot route by input size: no layer before the first batch norm sees a different "
        f"size at each of the scales {list(scales)}; use scales that differ more, or run each "
        "scale under sct.scale(model, s)"
    )


# ---------------------------------------------------------------------------------------------
# Rewrite


def replace_modules(model: nn.Module, replacements: Dict[int, nn.Module]) -> None:
    """Swap submodules by identity (``id(old) -> new``) under every parent that holds them."""
    for parent in list(model.modules()):  # snapshot: a new module may contain the old one
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[name] = replacements[id(child)]


def convert(
    model: nn.Module,
    scales: Sequence[Scale],
    unknown_scale: str = "nearest",
    *,
    in_chans: Optional[int] = None,
    example_input: Optional[torch.Tensor] = None,
    sampling: bool = True,
    antialias: bool = True,
    scale_specific_bn: bool = True,
) -> nn.Module:
    """Give every batch norm of ``model`` one branch per scale, in place, and return the model.

    Each branch starts as an exact copy of the original layer, so in eval mode the converted
    model computes what the original did at every scale. Inputs of spatial size (H, W) run
    the branch of the scale with that size; other sizes follow ``unknown_scale``. A model that
    cannot be converted is left unchanged.

    Conversion runs the model once per scale (eval, no grad) to check it accepts that size
    and to find the layer the input reaches first, then once in train mode at the smallest
    scale (batch 2, no grad; buffers restored), warning when only training fails there. The
    caller's RNG stream is not advanced.

    With ``sampling`` (the default) a train-mode forward is SCT's sampling phase: the batch
    is resized (bilinear, ``antialias`` when shrinking) to every scale, each resized batch runs
    with its own branch, and the forward returns :class:`ScaleOutputs`.

    Args:
        model: any ``nn.Module`` (timm, torchvision or your own) with batch norms.
        scales: the training scales, largest first by convention: ints (square) or
            ``(height, width)`` pairs. The first is the primary scale.
        unknown_scale: what an input of another size does: ``"nearest"`` (the branch of the
            nearest scale by pixel count, warned once per size) or ``"error"``.
        in_chans: channels of the probe input ``(1, C, H, W)``; by default from the first conv,
            then timm's config, else 3.
        example_input: an input for other layouts; its last two dims are replaced by each scale.
        sampling: train-mode forwards run every scale and return :class:`ScaleOutputs`.
        antialias: antialias the bilinear downsizing when sampling.
        scale_specific_bn: ``False`` keeps every norm layer shared and only adds the sampling
            forward: the paper's "SCT with shared BN" ablation (any norm layer, or none, is
            accepted).

    Returns:
        ``model`` itself, its class swapped for a same-named subclass that routes by input size.
        Raises :class:`ConversionError` (a ``ValueError``) naming the layer or scale when the model
        cannot be converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, CONTEXT_ATTR):
        raise ConversionError(
            "model is already converted (scales "
            f"{list(getattr(model, CONTEXT_ATTR).scales)}); use sct.add_scale to add a scale"
        )
    if "forward" in vars(model):
        raise ConversionError(
            "model has an instance-level forward attribute; convert the model before patching "
            "its forward, or wrap it in a module"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ConversionError("model is a TorchScript module; convert the eager model, then script it")
    if is_batch_norm(model):
        raise ConversionError("the model itself is a batch-norm layer; convert the model that holds it")
    context = ScaleContext(scales, unknown_scale)
    if not scale_specific_bn:
        return _install_sampling_only(model, context, sampling, antialias, example_input, in_chans)
    found, report = find_batch_norms(model)
    if not found:
        raise ConversionError(
            f"{type(model).__name__} has no batch-norm layer, so there is nothing to make "
            "scale-specific; SCT's S-BN needs BatchNorm layers (GroupNorm/LayerNorm models can "
            "train on several scales without conversion)"
        )
    bn_ids = {id(m) for _, m in found}
    with _rng_kept(model):
        bn_sizes: Dict[str, Optional[List[HW]]] = {}
        lead, (entry_name, entry_sizes) = _first_lead_that_runs(
            model, _probe_leads(model, in_chans, example_input),
            lambda lead: _probe_entry(model, context.sizes, context.scales, lead, bn_ids, bn_sizes))
        training_failure = _training_failure(model, context.sizes, context.scales, lead)
    if training_failure:
        warnings.warn(training_failure, UserWarning, stacklevel=2)
    for s, hw in zip(context.scales, entry_sizes):
        if hw[0] * hw[1] <= 1:
            warnings.warn(
                f"scale {s!r}: the model's first layer that normalises ('{entry_name}') sees this "
                "input as a single pixel, so the scale carries nothing useful; use a larger one",
                UserWarning, stacklevel=2)

    keys = context.keys
    replacements = {id(m): ScaleSpecificBatchNorm(m, keys, context) for _, m in found}
    for name, m in found:  # for TorchScript, where a layer can only route by its own input
        replacements[id(m)].sizes_here = [list(hw) for hw in bn_sizes.get(name) or []]
    entry = model.get_submodule(entry_name)
    replace_modules(model, replacements)
    entry = replacements.get(id(entry), entry)
    context.hook_id = entry.register_forward_pre_hook(EntryRouter(context)).id

    report.converted = [n for n, _ in found]
    report.entry = entry_name
    context.entry_sizes = entry_sizes
    context.entry_name = entry_name
    context.scale_specific_bn = True
    context.probe_lead = tuple(lead)  # leading input dims, for probing scales added later
    context.report = report
    context.sampling = sampling
    context.antialias = antialias
    _install(model, context)
    return model


def _install_sampling_only(model, context, sampling, antialias, example_input, in_chans):
    """Shared norm layers, SCT sampling only: nothing to route, so no probe for an entry."""
    with _rng_kept(model):
        lead, _ = _first_lead_that_runs(
            model, _probe_leads(model, in_chans, example_input),
            lambda lead: _probe_entry(model, context.sizes, context.scales, lead, set(), need_entry=False))
        training_failure = _training_failure(model, context.sizes, context.scales, lead)
    if training_failure:
        warnings.warn(training_failure, UserWarning, stacklevel=3)
    context.scale_specific_bn = False
    context.entry_name, context.hook_id, context.probe_lead = "", None, tuple(lead)
    context.report = ConversionReport(traced=False)
    context.sampling, context.antialias = sampling, antialias
    _install(model, context)
    return model


# ---------------------------------------------------------------------------------------------
# The converted class: a generated subclass, the way torch.nn.utils.parametrize does it

_CONVERTED_CLASSES: Dict[type, type] = {}


def converted_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """The subclass of ``cls`` a converted model has: same name, ``forward`` routes and samples.

    One class per original class, so pickling, ``copy.deepcopy`` and ``nn.DataParallel``
    replicas rebuild the same type. ``forward`` keeps the original's signature
    (``inspect.signature``, ``torch.export``'s ``dynamic_shapes`` matching).
    """
    if cls not in _CONVERTED_CLASSES:
        original = cls.forward

        @functools.wraps(original)
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return converted_forward(self, *args, **kwargs)

        _CONVERTED_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": forward,
            "__prepare_scriptable__": _scriptable_router,
            "__reduce_ex__": _reduce_converted,
            "_sct_original_class": cls,
            "_sct_original_forward": original,
            "_sct_image_parameter": image_parameter(original),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        })
    return _CONVERTED_CLASSES[cls]


def original_class(model: nn.Module) -> Type[nn.Module]:
    """The class ``model`` had before :func:`convert`.

    Args:
        model: a converted model.

    Returns:
        The original class (``convert`` swaps in a generated subclass of the same name).
    """
    return getattr(type(model), "_sct_original_class", type(model))


def _reduce_converted(self: nn.Module, protocol: int) -> tuple:
    # The generated class cannot be found by name; rebuild it from the original class.
    return (_new_converted, (self._sct_original_class,), self.__dict__)


def _new_converted(cls: Type[nn.Module]) -> nn.Module:
    sub = converted_class(cls)
    return sub.__new__(sub)


def _install(model: nn.Module, context: ScaleContext) -> None:
    setattr(model, CONTEXT_ATTR, context)
    model.__class__ = converted_class(type(model))
    scaled_type(tuple(context.scales))  # the train-mode output's type, made outside any compile


def _scriptable_router(model: nn.Module) -> nn.Module:
    ctx = context_of(model)
    if ctx.unknown_scale == "interpolate":
        raise ConversionError(
            "a model converted with unknown_scale='interpolate' cannot be scripted: TorchScript "
            "routes to one branch per call; export it with sct.export_program (which blends), or "
            "script a model converted with unknown_scale='nearest'")
    views = [_plain_copy(model, s, share_tensors=True) for s in ctx.scales]
    return ScriptedRouter(views, ctx.sizes, ctx.unknown_scale == "error").train(model.training)


# ---------------------------------------------------------------------------------------------
# Queries and the scale override


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel / ``torch.compile`` wrapper (itself otherwise)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and isinstance(getattr(inner, CONTEXT_ATTR, None), ScaleContext):
            return inner
    return model


def context_of(model: nn.Module) -> ScaleContext:
    """The :class:`ScaleContext` of a converted model: its scales, sizes and routing policy.

    Args:
        model: a converted model, or one wrapped in DDP, DataParallel or ``torch.compile``.

    Returns:
        The context shared by the model's S-BN layers. Raises ``ValueError`` if ``model`` is not
        converted.
    """
    ctx = getattr(unwrap(model), CONTEXT_ATTR, None)
    if isinstance(ctx, ScaleContext):
        return ctx
    raise ValueError(
        f"{type(model).__name__} is not a converted model; call sct.convert(model, scales) first"
    )


def scales_of(model: nn.Module) -> Tuple[Scale, ...]:
    """The model's scales, in the order given to :func:`convert`.

    Args:
        model: a converted model.

    Returns:
        A tuple of ints and ``(height, width)`` pairs.
    """
    return context_of(model).scales


def route(model: nn.Module, size: Any) -> Union[Scale, ScaleBlend]:
    """The scale whose branch serves an input of ``size``, by the model's routing policy.

    Args:
        model: a converted model.
        size: an image batch (its last two dims are read), an ``(h, w)`` pair or an int side.

    Returns:
        One of ``scales_of(model)``; under ``unknown_scale="interpolate"``, for a size strictly
        between two scales (by pixel count), a :class:`ScaleBlend` ``(low, high, t)``: the two
        scales whose BN tensors are blended, ``lerp(low, high, t)``. Raises ``ValueError`` for an
        untrained size under ``unknown_scale="error"``; warns once per size under ``"nearest"``,
        as a forward does.
    """
    ctx = context_of(model)
    hw = (int(size.shape[-2]), int(size.shape[-1])) if isinstance(size, torch.Tensor) else normalize_scale(size)
    chosen = route_size(ctx, hw)
    if isinstance(chosen, int):
        return ctx.scales[chosen]
    return ScaleBlend(ctx.scales[chosen.low], ctx.scales[chosen.high], chosen.t)


def scale_specific_layers(model: nn.Module) -> Iterator[Tuple[str, ScaleSpecificBatchNorm]]:
    """Every S-BN layer of a converted model, in module order.

    Args:
        model: a converted model.

    Returns:
        An iterator of ``(qualified name, ScaleSpecificBatchNorm)``.
    """
    for name, m in model.named_modules():
        if isinstance(m, ScaleSpecificBatchNorm):
            yield name, m


@contextlib.contextmanager
def scale(model: nn.Module, s: Scale) -> Iterator[nn.Module]:
    """Run every forward of ``model`` inside the block with branch ``s``, whatever the input size.

    The override holds for calls made from this thread (and asyncio task) only, so other
    threads serving the same model keep routing by size; it ends with the block. Train-mode
    calls inside it run that one scale (no sampling).

    Args:
        model: a converted model.
        s: one of its scales.

    Returns:
        A context manager yielding ``model``.
    """
    ctx = context_of(model)
    with pinned(ctx, ctx.index(s)):
        yield model


def _plain_copy(model: nn.Module, s: Scale, share_tensors: bool = False) -> nn.Module:
    """The original architecture with branch ``s`` in place of every S-BN; ``model`` untouched."""
    inner = unwrap(model)
    ctx = context_of(inner)
    key = scale_key(ctx.sizes[ctx.index(s)])
    memo: Dict[int, Any] = {id(ctx): ctx}
    if share_tensors:
        for t in list(inner.parameters()) + list(inner.buffers()):
            memo[id(t)] = t
    for _, sbn in scale_specific_layers(inner):
        memo[id(sbn)] = copy.deepcopy(sbn.branches[key], memo)
    plain = copy.deepcopy(inner, memo)
    plain.__class__ = original_class(inner)
    vars(plain).pop(CONTEXT_ATTR, None)
    for m in plain.modules():
        for hook_id, hook in list(m._forward_pre_hooks.items()):
            if isinstance(hook, EntryRouter):
                del m._forward_pre_hooks[hook_id]
    return plain


def extract(model: nn.Module, s: Scale) -> nn.Module:
    """A copy of the original architecture (original classes, no S-BN) with branch ``s``'s state.

    Args:
        model: a converted model (or a DDP / DataParallel wrapper of one); left unchanged.
        s: one of its scales.

    Returns:
        A new module of the model's original class whose ``state_dict`` has exactly the
        original keys; in eval mode it computes what the converted model computes at ``s``.
    """
    return _plain_copy(model, s)
