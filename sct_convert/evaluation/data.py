"""Labelled image folders read as timm's ``validate.py`` reads them, at any input size.

One reader for every command that takes a folder (``sct.evaluate``, ``sct-convert evaluate``,
``calibrate`` and ``cascade``): timm's ``ImageDataset`` (class folders in natural sort order, RGB
or, for one-channel models, L) and the model's own data config (timm's ``resolve_data_config``:
mean, std, interpolation, crop_pct; overridable), with at each size a resize to
``size / crop_pct`` and a center crop to the size (``timm.data.create_transform``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._utils.files import PathLike, existing_directory
from ..core.model import context_of, is_converted, unwrap
from ..core.scales import HW


def resolve_data_config(model: nn.Module, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The model's eval data config (timm's ``resolve_data_config``) with ``overrides`` applied.

    Args:
        model: the model (a converted one reads its probe's channel count).
        overrides: any of ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``.

    Returns:
        timm's data config dict; ``input_size``'s channels are the model's. A one-channel model
        whose config still holds three-channel mean / std (timm keeps ImageNet's) is refused
        with a ``ValueError`` asking for ``mean`` and ``std``.
    """
    import timm.data

    channels = _channels(model)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    config = timm.data.resolve_data_config({**overrides, "in_chans": channels}, model=unwrap(model))
    config["input_size"] = (channels, *config["input_size"][1:])  # timm keeps its config's 3 here
    for key in ("mean", "std"):
        if len(config[key]) != channels:
            raise ValueError(
                f"the model takes {channels} channel(s) but its data config has {len(config[key])} {key} "
                f"values {tuple(config[key])}; pass the {key} it was trained with (--mean / --std)")
    return config


def _channels(model: nn.Module) -> int:
    lead = context_of(model).probe_lead if is_converted(model) else ()
    if len(lead) > 1:  # the channels convert's probe ran with
        return int(lead[1])
    from ..conversion.probe import stem_conv

    conv = stem_conv(unwrap(model))
    return int(conv.in_channels) if conv is not None else 3


def transform_at(config: Dict[str, Any], hw: HW) -> Any:
    """timm's eval transform (resize to ``size / crop_pct``, center crop) at ``hw``."""
    import timm.data

    return timm.data.create_transform(input_size=(config["input_size"][0], *hw), interpolation=config["interpolation"],
                                      mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"],
                                      crop_mode=config.get("crop_mode", "center"), is_training=False)


def image_dataset(root: PathLike, config: Dict[str, Any], class_map: Any = None, what: str = "images folder") -> Any:
    """The labelled images under ``root`` (one folder per class), untransformed.

    Args:
        root: the folder.
        config: the model's data config (:func:`resolve_data_config`); its channel count picks
            RGB or L.
        class_map: timm's ``class_map`` (a file or dict of folder name -> class index), if any.
        what: how errors name ``root`` (a CLI option such as ``--images``).

    Returns:
        timm's ``ImageDataset``; a ``ValueError`` naming ``root`` if it is missing, unreadable or empty.
    """
    import timm.data

    root = existing_directory(root, what)
    mode = "RGB" if config["input_size"][0] == 3 else "L"
    try:
        dataset = timm.data.ImageDataset(str(root), input_img_mode=mode, class_map=class_map or "")
    except (OSError, RuntimeError, ValueError) as e:  # timm: RuntimeError for no images, OSError unreadable
        raise ValueError(f"cannot read images from {root}: {' '.join(str(e).split())}") from None
    if len(dataset) == 0:
        raise ValueError(f"no images found in {root} (expected one folder per class)")
    return dataset


class SizedSubset(torch.utils.data.Dataset):
    """``dataset[indices]`` with the transform of one size (the base dataset is shared)."""

    def __init__(self, dataset: Any, indices: Sequence[int], transform: Any) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image, target = self.dataset[self.indices[i]]
        return self.transform(image), target


def split_indices(n: int, holdout: int, max_images: Optional[int]) -> Tuple[List[int], List[int]]:
    """(scored, calibration) indices: a seeded shuffle, the first ``holdout`` for calibration."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    calibration, scored = order[:holdout], sorted(order[holdout:])
    return (scored if max_images is None else scored[:max_images]), calibration


def loader_at(dataset: Any, indices: Sequence[int], config: Dict[str, Any], hw: HW, batch_size: int,
            workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(SizedSubset(dataset, indices, transform_at(config, hw)), batch_size=batch_size,
                                       num_workers=workers, shuffle=False)
