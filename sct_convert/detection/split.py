"""A torchvision detector split in three for deployment: pre-processing, a tensor-in / tensor-out
core that switches scale, and post-processing.

The *core* is the part with the weights that run on every pixel: the backbone (with its FPN) and
the dense heads (RetinaNet's, FCOS's and SSD's heads; the RPN head of Faster / Mask / Keypoint
R-CNN). It takes the batch tensor the model's transform builds (resized, normalised, padded) and
returns the feature maps and the raw head outputs, one named tensor each: ``feature_<name>``,
then ``cls_logits`` / ``bbox_regression`` (/ ``bbox_ctrness``) or, for R-CNN, ``objectness_<i>``
and ``bbox_deltas_<i>`` per level. That is what a runtime without torchvision's control flow
(TensorRT, a dynamic-shape ONNX runtime) serves, as NVIDIA's retinanet-examples and
mmdetection's ``--skip-postprocess`` do.

:func:`detector_preprocess` and :func:`detector_postprocess` are torchvision's own transform,
anchor generator, proposal filter, box decoding, NMS and ``transform.postprocess``, so that
pre + core + post is the converted model at that scale. For the R-CNN family the second stage
(RoI pooling over the proposals, the box, mask and keypoint heads) runs in the post-processing,
under the scale's branch: it works on a data-dependent set of proposals.

A switchable core file takes two inputs: the batch (``images``) and the side the batch was
resized to (``size``, int64 of shape ``[1]``: the transform's ``min_size``, or the shorter side
of SSD's ``fixed_size``), and runs the branch of the nearest scale
(:func:`sct_convert.core.rule.core_index`). The batch's shape cannot tell the scale: the transform
pads images of both orientations into one square batch, and caps the longer side of a wide one.
:meth:`DetectorBatch.feeds` gives both inputs; a per-scale core takes ``images`` only.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.route import call_with, pin_of, scale_route
from ..core.model import context_of, is_converted, scale as pinned_scale, unwrap
from ..core.rule import core_index
from ..core.scales import HW, Scale, model_device, scale_key, short_side

FEATURE = "feature_"


class DetectorBatch(NamedTuple):
    """What :func:`detector_preprocess` gives: the core's input and what the post-processing needs.

    Attributes:
        tensor: the ``(N, 3, H, W)`` batch, resized to the scale, normalised and padded.
        image_sizes: each image's ``(h, w)`` inside ``tensor`` (before the padding).
        original_sizes: each image's ``(h, w)`` as given, which the detections are mapped back to.
        scale: the scale the batch was resized to.
        side: that scale's side (what a switchable core routes by).
    """

    tensor: torch.Tensor
    image_sizes: List[Tuple[int, int]]
    original_sizes: List[Tuple[int, int]]
    scale: Scale
    side: int

    def feeds(self, switchable: bool = True) -> Dict[str, np.ndarray]:
        """The inputs of a core file in onnxruntime: ``images`` and (``switchable``) ``size``."""
        feeds = {"images": self.tensor.detach().cpu().numpy()}
        if switchable:
            feeds["size"] = np.asarray([self.side], dtype=np.int64)
        return feeds


def _family(detector: nn.Module) -> str:
    """``"rcnn"``, ``"retinanet"``, ``"fcos"`` or ``"ssd"``; ``ValueError`` for anything else."""
    from torchvision.models.detection import FCOS, RetinaNet, generalized_rcnn, ssd

    for family, cls in (("rcnn", generalized_rcnn.GeneralizedRCNN), ("retinanet", RetinaNet),
                        ("fcos", FCOS), ("ssd", ssd.SSD)):
        if isinstance(detector, cls):
            return family
    raise ValueError(
        f"{type(detector).__name__} is not a torchvision detector (Faster / Mask / Keypoint R-CNN, "
        "RetinaNet, FCOS, SSD, SSDlite): the detector core is built from their modules")


class DetectorCore(nn.Module):
    """The backbone and dense heads of a torchvision detector, tensor in, named tensors out.

    Built on the detector's own modules (shared, not copied). Over a converted detector it runs
    the branch the batch's shape routes to (see the module doc); over a plain one (``sct.extract``)
    it is that scale's core. An ``sct.scale(model, s)`` pin holds for it as for the model.

    Args:
        detector: a torchvision detector, converted or plain.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        inner = unwrap(detector)
        self.family = _family(inner)
        self.backbone = inner.backbone
        self.head = inner.rpn.head if self.family == "rcnn" else inner.head
        # the converted model's routing context (None for a plain detector); not a submodule
        self.__dict__["_context"] = context_of(inner) if is_converted(inner) else None

    def forward(self, images: torch.Tensor, size: Any = None) -> Dict[str, torch.Tensor]:
        """The core's outputs for ``images``; over a converted detector, the branch of the scale
        whose side is nearest ``size`` (an int or a one-element tensor), or of an ``sct.scale`` pin."""
        ctx = self._context
        if ctx is None:
            return self._outputs(images)
        route = pin_of(ctx)  # an sct.scale pin decides, as it does for the model
        if route is None:
            if size is None:
                raise ValueError("a switchable detector core needs the side its batch was resized to: "
                                 "core(batch.tensor, batch.side), or run it inside sct.scale(model, s)")
            route = scale_route(ctx, core_index(int(size), [short_side(hw) for hw in ctx.sizes]))
        return call_with(ctx, route, self._outputs, images)

    def _outputs(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        out = {FEATURE + name: f for name, f in features.items()}
        if self.family == "rcnn":
            objectness, deltas = self.head(list(features.values()))
            out.update({f"objectness_{i}": o for i, o in enumerate(objectness)})
            out.update({f"bbox_deltas_{i}": d for i, d in enumerate(deltas)})
        else:
            out.update(self.head(list(features.values())))
        return out


def detector_core(model: nn.Module) -> DetectorCore:
    """The switchable core of a converted torchvision detector, in PyTorch (what
    ``sct.export_onnx(model, path, part="core")`` writes).

    Args:
        model: a converted torchvision detector (Faster / Mask / Keypoint R-CNN, RetinaNet, FCOS,
            SSD, SSDlite).

    Returns:
        A :class:`DetectorCore`: ``core(batch.tensor, batch.side)`` gives the feature maps and raw
        head outputs as a dict of named tensors, running the branch of that scale.
    """
    context_of(model)  # a clear error for a model that is not converted
    return DetectorCore(model)


def _transform(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    _family(inner)
    return inner.transform


def detector_preprocess(model: nn.Module, images: Sequence[torch.Tensor], scale: Scale) -> DetectorBatch:
    """torchvision's transform of the model at one scale: resize, normalise, pad into a batch.

    Args:
        model: a converted torchvision detector.
        images: ``(3, H, W)`` images in 0-1, any sizes (as the model takes them).
        scale: the scale to resize to, one of the model's.

    Returns:
        A :class:`DetectorBatch`: the core's inputs (:meth:`DetectorBatch.feeds`) and the sizes
        :func:`detector_postprocess` needs.
    """
    ctx = context_of(model)
    transform = _transform(model)
    images = list(images)
    original = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    with pinned_scale(model, scale), torch.no_grad():
        batch, _ = transform(images)
    index = ctx.index(scale)
    return DetectorBatch(batch.tensors, [tuple(s) for s in batch.image_sizes], original, ctx.scales[index],
                         short_side(ctx.sizes[index]))


def detector_postprocess(model: nn.Module, outputs: Mapping[str, Any],
                         batch: DetectorBatch) -> List[Dict[str, torch.Tensor]]:
    """torchvision's post-processing of the core's outputs: what the model returns in eval mode.

    Anchors, box decoding, score threshold, top-k and NMS (for R-CNN: the proposal filter, then
    the second stage at the batch's scale), then boxes (masks, keypoints) mapped back to each
    image's original size, all by the model's own modules.

    Args:
        model: the converted torchvision detector the core was exported from, in eval mode.
        outputs: the core's outputs by name (tensors or NumPy arrays, as onnxruntime returns them:
            ``dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))``).
        batch: the :class:`DetectorBatch` the core ran on.

    Returns:
        One dict per image (``boxes``, ``scores``, ``labels``; ``masks``, ``keypoints`` where the
        model has them), as ``model(images)`` returns in eval mode.
    """
    from torchvision.models.detection.image_list import ImageList

    inner = unwrap(model)
    family = _family(inner)
    if inner.training:
        raise ValueError("detector_postprocess runs the model's eval-mode post-processing: call model.eval() first")
    device = model_device(inner)
    given = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).to(device)
             for k, v in outputs.items()}
    features = OrderedDict((k[len(FEATURE):], v) for k, v in given.items() if k.startswith(FEATURE))
    if not features:
        raise ValueError(f"no feature_* outputs among {sorted(given)}: pass the core's outputs by name")
    levels = list(features.values())
    images = ImageList(batch.tensor.to(device), list(batch.image_sizes))
    with pinned_scale(model, batch.scale), torch.no_grad():
        if family == "rcnn":
            detections = _rcnn(inner, given, features, images)
        else:
            anchors = inner.anchor_generator(images, levels)
            heads = {k: v for k, v in given.items() if not k.startswith(FEATURE)}
            if family == "ssd":
                detections = inner.postprocess_detections(heads, anchors, images.image_sizes)
            else:
                per_level = [f.size(2) * f.size(3) for f in levels]
                if family == "retinanet":  # anchors per location, as RetinaNet.forward counts them
                    per_level = [n * (heads["cls_logits"].size(1) // sum(per_level)) for n in per_level]
                split = {k: list(v.split(per_level, dim=1)) for k, v in heads.items()}
                detections = inner.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                          images.image_sizes)
        return inner.transform.postprocess(detections, images.image_sizes, list(batch.original_sizes))


def _rcnn(detector: nn.Module, given: Dict[str, torch.Tensor], features: "OrderedDict[str, torch.Tensor]",
          images: Any) -> List[Dict[str, torch.Tensor]]:
    """The tail of torchvision's ``RegionProposalNetwork.forward``, then the RoI heads."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    rpn = detector.rpn
    count = sum(1 for k in given if k.startswith("objectness_"))
    objectness = [given[f"objectness_{i}"] for i in range(count)]
    deltas = [given[f"bbox_deltas_{i}"] for i in range(count)]
    anchors = rpn.anchor_generator(images, list(features.values()))
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    detections, _ = detector.roi_heads(features, boxes, images.image_sizes)
    return detections


def core_sides(model: nn.Module) -> List[int]:
    """Each scale's side: what the transform resizes the shorter side to (SSD: its fixed size's
    shorter side), what a switchable core routes by."""
    return [short_side(hw) for hw in context_of(model).sizes]


def check_core_sides(model: nn.Module) -> List[int]:
    """:func:`core_sides`, refusing scales of the same side (one core could not tell them apart)."""
    ctx = context_of(model)
    sides = core_sides(model)
    for i, side in enumerate(sides):
        if side in sides[:i]:
            j = sides.index(side)
            raise ValueError(
                f"scales {scale_key(ctx.sizes[j])} and {scale_key(ctx.sizes[i])} have the same side ({side}), so "
                "one core file cannot tell them apart: export each scale's core (scale=..., part='core')")
    return sides


def core_example(model: nn.Module, s: Scale) -> HW:
    """A batch size of scale ``s`` to trace its core at: wider than tall by one padding step
    (not square, so that torch.export keeps height and width apart)."""
    ctx = context_of(model)
    h, w = ctx.sizes[ctx.index(s)]
    step = max(int(getattr(_transform(model), "size_divisible", 1)), 8)
    return -(-h // step) * step, -(-w // step) * step + step


__all__ = ["DetectorBatch", "DetectorCore", "detector_core", "detector_preprocess", "detector_postprocess"]
