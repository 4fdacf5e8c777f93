"""What a data loader's batch holds: its images, and its labels where it has them.

One rule for every consumer of a user's loader (``sct.calibrate``, ``sct.fit_cascade``): a
tensor, a ``(images, labels, ...)`` tuple or list, or a dict with one of :data:`IMAGE_KEYS`
(and, for labels, one of :data:`LABEL_KEYS`).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

IMAGE_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def _entry(batch: dict, keys: Tuple[str, ...]) -> Any:
    return next((batch[k] for k in keys if isinstance(batch.get(k), torch.Tensor)), None)


def images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch; ``TypeError`` naming the batch's type and what is accepted."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and _entry(batch, IMAGE_KEYS) is not None:
        return _entry(batch, IMAGE_KEYS)
    raise TypeError(
        f"cannot find images in a batch of type {type(batch).__name__}: yield tensors, "
        f"(images, labels) tuples or dicts with one of the keys {IMAGE_KEYS}"
    )


def labelled(batch: Any, needed_by: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a labelled batch; ``ValueError`` naming ``needed_by`` for an unlabelled one."""
    labels = None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[1]
    elif isinstance(batch, dict):
        labels = _entry(batch, LABEL_KEYS)
    if labels is None or isinstance(batch, torch.Tensor):
        raise ValueError(f"{needed_by} needs labelled data: a loader of (images, labels) batches "
                         f"or dicts with one of the keys {LABEL_KEYS}")
    return images_of(batch), torch.as_tensor(labels)
