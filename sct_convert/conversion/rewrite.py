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

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.batchnorm import ScaleSpecificBatchNorm, is_batch_norm
from ..core.context import CONTEXT_ATTR, ScaleContext, recorded_origin
from ..core.scales import HW, Scale, model_device, normalize_scales, pixels, require_largest_first, scale_key
from ..core.model import install, route
from ..core.detector_forward import install_sized_transform
from ..core.resizer import find_resizer, sized_attributes, transform_size
from ..errors import ConversionError
from .discovery import ConversionReport, find_batch_norms
from .probe import describe_failure, first_lead_that_runs, probe_entry, probe_leads, rng_kept, training_failure
from .._utils.modes import run_mode
from ..core.route import EntryRouter

class OneScaleWarning(UserWarning):
    """A model converted at one scale: that is plain training at that size, not SCT."""


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

    Conversion runs the model once per scale (eval, no grad) to check it accepts that size and
    find the layer the input reaches first, then once in train mode at the smallest scale (batch
    2, no grad; buffers restored), warning when only training fails; the RNG is not advanced.
    With ``sampling`` a train-mode forward is SCT's sampling phase: the batch is resized
    (bilinear) to every scale, each runs with its own branch, and it returns :class:`ScaleOutputs`.

    Args:
        model: any ``nn.Module`` (timm, torchvision or your own) with batch norms.
        scales: the training scales, largest first by pixel count (another order is a
            ``ValueError``): ints (square) or ``(height, width)`` pairs (``"224x192"`` on the CLI
            is one such pair, not two scales), Python or NumPy integers. The first is the primary
            scale. One scale warns: that is plain training.
        unknown_scale: what an input of another size does: ``"nearest"`` (the branch of the
            nearest scale by pixel count, warned once per size), ``"interpolate"`` (BN blended
            in pixel count between the two bracketing branches) or ``"error"``.
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
    scales = normalize_scales(scales)[0]
    require_largest_first(scales)
    return convert_in_order(model, scales, unknown_scale, in_chans=in_chans, example_input=example_input,
                            sampling=sampling, antialias=antialias, scale_specific_bn=scale_specific_bn)


def convert_in_order(model: nn.Module, scales: Sequence[Scale], unknown_scale: str = "nearest", *,
                     in_chans: Optional[int] = None, example_input: Optional[torch.Tensor] = None,
                     sampling: bool = True, antialias: bool = True, scale_specific_bn: bool = True) -> nn.Module:
    """:func:`convert` with the scales in any order: a file's layout, which ``sct.add_scale``
    (it appends) may have left in another order than largest first."""
    _check_convertible(model)
    context = ScaleContext(scales, unknown_scale, sampling=sampling, antialias=antialias,
                           scale_specific_bn=scale_specific_bn, origin=recorded_origin(model))
    if len(context.scales) == 1:
        warnings.warn(
            f"sct_convert: one scale ({scale_key(context.sizes[0])}) is plain training at that size; SCT "
            "needs two or more, e.g. scales=[224, 192, 128] (a scale written HxW, such as 224x192, is "
            "one non-square scale, not two)", OneScaleWarning, stacklevel=3)
    resizer = find_resizer(model)
    if resizer:  # torchvision detection: the scale is the size its transform resizes to
        return _convert_resizing_model(model, context, resizer)
    if not scale_specific_bn:
        return _install_sampling_only(model, context, example_input, in_chans)
    return _convert_batch_norms(model, context, example_input, in_chans)


def _convert_batch_norms(model: nn.Module, context: ScaleContext, example_input: Optional[torch.Tensor],
                         in_chans: Optional[int]) -> nn.Module:
    """The usual path: find the batch norms, probe the entry layer at every scale, branch them."""
    found, report = find_batch_norms(model)
    if not found:
        raise ConversionError(
            f"{type(model).__name__} has no batch-norm layer, so there is nothing to make "
            "scale-specific; SCT's S-BN needs BatchNorm layers (GroupNorm/LayerNorm models can "
            "train on several scales without conversion)"
        )
    bn_sizes: Dict[str, Optional[List[HW]]] = {}
    with rng_kept(model):
        lead, (entry_name, entry_sizes) = first_lead_that_runs(
            model, probe_leads(model, in_chans, example_input),
            lambda lead: probe_entry(model, context.sizes, context.scales, lead,
                                     {id(m) for _, m in found}, bn_sizes))
        failure = training_failure(model, context.sizes, context.scales, lead)
    if failure:
        warnings.warn(failure, UserWarning, stacklevel=4)
    for s, hw in zip(context.scales, entry_sizes):
        if pixels(hw) <= 1:
            warnings.warn(
                f"scale {s!r}: the model's first layer that normalises ('{entry_name}') sees this "
                "input as a single pixel, so the scale carries nothing useful; use a larger one",
                UserWarning, stacklevel=4)
    context.entry_name, context.entry_sizes, context.probe_lead = entry_name, entry_sizes, tuple(lead)
    report.converted, report.entry = [n for n, _ in found], entry_name
    context.report = report
    _branch_batch_norms(model, context, found, bn_sizes)
    install(model, context)
    return model


def _check_convertible(model: nn.Module) -> None:
    """Refuse what ``convert`` cannot take, before anything runs."""
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


def _branch_batch_norms(model: nn.Module, context: ScaleContext, found: List[Tuple[str, nn.Module]],
                        bn_sizes: Dict[str, Optional[List[HW]]]) -> None:
    """Swap every found batch norm for its S-BN; hook the entry router on the entry layer."""
    replacements = {id(m): ScaleSpecificBatchNorm(m, context.keys, context) for _, m in found}
    for name, m in found:  # for TorchScript, where a layer can only route by its own input
        replacements[id(m)].sizes_here = [list(hw) for hw in bn_sizes.get(name) or []]
    entry = model.get_submodule(context.entry_name)
    replace_modules(model, replacements)
    entry = replacements.get(id(entry), entry)
    context.hook_id = entry.register_forward_pre_hook(EntryRouter(context)).id


def _convert_resizing_model(model: nn.Module, context: ScaleContext, resizer: str) -> nn.Module:
    """Convert a model that resizes its own input (a torchvision detection model): every scale
    reaches the backbone at the size its transform resizes to, so there is no entry layer to
    probe for; each scale is run once (eval, one image) to check the model accepts it."""
    transform = model.get_submodule(resizer)
    found, report = find_batch_norms(model) if context.scale_specific_bn else ([], ConversionReport(traced=False))
    if context.scale_specific_bn and not found:
        raise ConversionError(f"{type(model).__name__} has no batch-norm layer, so there is nothing to make "
                              "scale-specific; pass scale_specific_bn=False for SCT sampling alone")
    with rng_kept(model), run_mode(model), torch.no_grad():
        saved = dict(vars(transform))
        for s, hw in zip(context.scales, context.sizes):
            vars(transform).update(sized_attributes(transform, hw))
            try:
                model([torch.rand(3, *hw, device=model_device(model))])
            except Exception as e:  # noqa: BLE001 - any failure means the scale cannot be served
                raise ConversionError(f"model cannot run with its transform at scale {s!r}: "
                                      f"{describe_failure(e)}; drop that scale") from e
            finally:
                vars(transform).clear()
                vars(transform).update(saved)
    context.resizer = context.entry_name = resizer
    context.entry_sizes, context.probe_lead = list(context.sizes), (1, 3)
    report.converted, report.entry = [n for n, _ in found], resizer
    context.report = report
    if context.scale_specific_bn:
        _branch_batch_norms(model, context, found, {})
    install_sized_transform(transform, context)
    install(model, context)
    own = transform_size(transform)
    if own not in context.sizes:
        attr = "fixed_size" if getattr(transform, "fixed_size", None) else "min_size"
        warnings.warn(
            f"sct_convert: {type(model).__name__}'s transform resizes to {scale_key(own)}, which is not one of "
            f"the scales {', '.join(scale_key(hw) for hw in context.sizes)}: in eval it runs the branch of "
            f"{route(model, own)!r} at {scale_key(own)}. Set model.{resizer}.{attr} to a trained scale, serve "
            "under sct.scale(model, s), or convert with scales that include its size", UserWarning, stacklevel=4)
    return model


def _install_sampling_only(model: nn.Module, context: ScaleContext, example_input: Optional[torch.Tensor],
                           in_chans: Optional[int]) -> nn.Module:
    """Shared norm layers, SCT sampling only: nothing to route, so no probe for an entry."""
    with rng_kept(model):
        lead, _ = first_lead_that_runs(
            model, probe_leads(model, in_chans, example_input),
            lambda lead: probe_entry(model, context.sizes, context.scales, lead, set(), need_entry=False))
        failure = training_failure(model, context.sizes, context.scales, lead)
    if failure:
        warnings.warn(failure, UserWarning, stacklevel=4)
    context.entry_name, context.hook_id, context.probe_lead = "", None, tuple(lead)
    context.report = ConversionReport(traced=False)
    install(model, context)
    return model
