"""Model names to timm / torchvision models, offline: nothing is downloaded at run time."""
from __future__ import annotations

import difflib
import os
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ..core.context import record_origin, recorded_origin

SOURCES = ("timm", "torchvision")


def timm_names() -> List[str]:
    import timm

    return timm.list_models()


#: torchvision's model families sct-convert builds by name (``torchvision.models.<family>``).
TORCHVISION_FAMILIES = ("classification", "segmentation", "video", "detection")


def torchvision_family(name: str) -> Optional[str]:
    """The ``torchvision.models`` family that has ``name`` (``"classification"`` for the top
    level; also ``"optical_flow"`` / ``"quantization"``, which are not converted), or None."""
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return "classification"
    for family in ("segmentation", "video", "detection", "optical_flow", "quantization"):
        if name in torchvision.models.list_models(module=getattr(torchvision.models, family)):
            return family
    return None


def torchvision_names() -> List[str]:
    """Every model of the families sct-convert builds, classification first."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    for family in TORCHVISION_FAMILIES[1:]:
        names += torchvision.models.list_models(module=getattr(torchvision.models, family))
    return names


def _is_timm(name: str) -> bool:
    import timm

    return timm.is_model(name.split(".")[0]) if name else False


def resolve(name: str, source: Optional[str] = None) -> str:
    """Library that provides ``name`` (timm first when both do); ``ValueError`` with close matches."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: choose timm or torchvision")
    in_timm = source in (None, "timm") and _is_timm(name)
    family = torchvision_family(name) if source in (None, "torchvision") else None
    if in_timm:
        return "timm"
    if family in TORCHVISION_FAMILIES:
        return "torchvision"
    if family is not None:
        raise ValueError(
            f"{name!r} is a torchvision {family.replace('_', ' ')} model, which sct-convert does not "
            f"convert; it builds torchvision's {', '.join(TORCHVISION_FAMILIES)} models"
        )
    names: List[str] = []
    if source in (None, "timm"):
        names += timm_names()
    if source in (None, "torchvision"):
        seen = set(names)
        names += [n for n in torchvision_names() if n not in seen]  # a shared name once
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    where = f" in {source}" if source else " in timm or torchvision"
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{where}{hint}")


def _cached_torchvision_weights(name: str) -> Optional[str]:
    import torch.hub
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return path if os.path.exists(path) else None


def _cached_timm_weights(name: str) -> Optional[str]:
    import timm
    import torch.hub

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            return None
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str) and os.path.exists(path):
                return path
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.exists(path):
            return path
    return None


def create_model(
    name: str,
    source: Optional[str] = None,
    *,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    **kwargs: Any,
) -> Tuple[nn.Module, str]:
    """Build ``name`` from timm or torchvision; return ``(model, source)``.

    ``pretrained=True`` uses weights only when they are already in the local cache and raises a
    ``ValueError`` saying so otherwise.
    """
    source = resolve(name, source)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if source == "timm":
        import timm

        if pretrained:
            path = _cached_timm_weights(name)
            if path is None:
                raise ValueError(
                    f"pretrained weights for timm model {name!r} are not in the local cache and "
                    "nothing is downloaded at run time; pass --checkpoint FILE instead"
                )
            kwargs["pretrained_cfg_overlay"] = {"file": path}
        return timm.create_model(name, pretrained=pretrained, **kwargs), source
    import torchvision

    weights = None
    if pretrained:
        if _cached_torchvision_weights(name) is None:
            raise ValueError(
                f"pretrained weights for torchvision model {name!r} are not in the local cache "
                "and nothing is downloaded at run time; pass --checkpoint FILE instead"
            )
        weights = "DEFAULT"
    if torchvision_family(name) in ("segmentation", "detection"):
        kwargs.setdefault("weights_backbone", None)  # else torchvision downloads ImageNet backbone weights
    model = torchvision.models.get_model(name, weights=weights, **kwargs)
    record_origin(model, name, source)  # torchvision models do not carry their name
    return model, source


def arch_info(model: nn.Module) -> Dict[str, str]:
    """``{"arch", "source"}`` of a model built by timm or :func:`create_model`, else empty."""
    recorded = recorded_origin(model)
    if recorded:
        return recorded
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return {"arch": str(cfg["architecture"]), "source": "timm"}
    return {}
