"""A converted model's scales and settings, shared by the model and its S-BN layers.

A :class:`ScaleContext` is a plain object (not a module, so it never enters ``state_dict``)
holding what does not change from call to call: the scales, the routing policy, sampling
settings. The converted model and every S-BN layer hold the same instance; a
``copy.deepcopy`` or pickle of the model copies it once and keeps that sharing.

Which branch a call runs is *not* stored here, nor anywhere on the model: that is the call's
route (:mod:`sct_convert.core.route`), held per thread for the duration of the call.
"""
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from ..metadata_fields import ROUTING_POLICIES
from .scales import HW, Scale, normalize_scale, normalize_scales, scale_key


#: Attribute of a converted model that holds its :class:`ScaleContext`.
CONTEXT_ATTR = "_sct_context"


@dataclass(eq=False)  # identity equality and hash: contexts key the per-call route maps
class ScaleContext:
    """A converted model's scales, routing policy, entry layer and sampling settings.

    The converted model and every S-BN layer hold the same instance. Nothing here changes
    during a forward: the per-call branch is the call's route (:mod:`sct_convert.core.route`).

    Args:
        scales: ints (square) or ``(height, width)`` pairs, as given to ``convert``.
        unknown_scale: ``"nearest"``, ``"error"`` or ``"interpolate"`` (see
            :mod:`sct_convert.core.rule`), for input sizes that are not a scale.
        entry_name: the model's entry layer, which routes calls that bypass the model's forward.
        entry_sizes: the spatial size the entry layer sees for an image at each scale.
        probe_lead: the leading dims of an input, ``(N, C)`` or ``(N, C, T)`` for clips.
        sampling: a train-mode forward runs every scale (SCT's sampling phase).
        antialias: antialias when sampling resizes down.
        sample_subset: indices of the scales sampling runs; ``None`` for all.
        sample_between: sampling also runs one random size between the trained scales.
        scale_specific_bn: ``False`` for shared norm layers (sampling only).
        report: what ``convert`` found (a ``ConversionReport``).
        hook_id: id of the entry router's hook, when the entry layer is not an S-BN.
        resizer: the module that resizes the model's input itself (a torchvision detection
            transform), ``""`` for none; when set, a call routes by that module's size.
        origin: ``{"arch", "source"}`` of a model built by name (:func:`record_origin`), else empty.
    """

    scales: Tuple[Scale, ...]
    unknown_scale: str = "nearest"
    entry_name: str = ""
    entry_sizes: List[HW] = field(default_factory=list)
    probe_lead: Tuple[int, ...] = (1, 3)
    sampling: bool = True
    antialias: bool = True
    sample_subset: Optional[List[int]] = None
    sample_between: bool = False
    scale_specific_bn: bool = True
    report: Any = None
    hook_id: Optional[int] = None
    resizer: str = ""
    origin: Dict[str, str] = field(default_factory=dict)
    sizes: Tuple[HW, ...] = field(init=False)
    keys: Tuple[str, ...] = field(init=False)
    warned: Set[Any] = field(init=False, repr=False)  # sizes already warned about

    def __post_init__(self) -> None:
        if self.unknown_scale not in ROUTING_POLICIES:
            raise ValueError(
                f"unknown_scale={self.unknown_scale!r}: choose one of {', '.join(ROUTING_POLICIES)}"
            )
        self.set_scales(*normalize_scales(self.scales))
        if not self.entry_sizes:
            self.entry_sizes = list(self.sizes)

    def set_scales(self, scales: Tuple[Scale, ...], sizes: Tuple[HW, ...]) -> None:
        """Replace the scales (as given, and as ``(h, w)``); keys are kept precomputed for S-BN."""
        self.scales, self.sizes = tuple(scales), tuple(sizes)
        self.keys = tuple(scale_key(hw) for hw in self.sizes)
        self.warned = set()

    def sample_indices(self) -> List[int]:
        """Scales a sampling forward runs, in the model's scale order."""
        return list(self.sample_subset) if self.sample_subset is not None else list(range(len(self.sizes)))

    def index(self, scale: object) -> int:
        """Position of ``scale`` in this model's scales; ``ValueError`` naming them if absent."""
        hw = normalize_scale(scale)
        try:
            return self.sizes.index(hw)
        except ValueError:
            raise ValueError(
                f"scale {scale!r} is not one of this model's scales {list(self.scales)}; "
                "add it with sct.add_scale or pick one of those"
            ) from None

    def fx_key(self) -> int:
        """A key an FX graph can hold (an int) to reach this context at run time."""
        _LIVE_CONTEXTS[id(self)] = self
        return id(self)


# Contexts that FX graphs route for, by fx_key; weak, so a graph does not keep a model alive.
_LIVE_CONTEXTS: "weakref.WeakValueDictionary[int, ScaleContext]" = weakref.WeakValueDictionary()


@torch.jit.ignore
def live_context(key: int) -> Optional[ScaleContext]:
    """The context an FX graph's ``fx_key`` names, while its model is alive."""
    return _LIVE_CONTEXTS.get(key)


# Models built by name -> {"arch", "source"}. Kept here, weakly, rather than as an attribute of
# the user's model; a converted model carries it in its context (pickles and copies keep it).
_ORIGINS: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, str]]" = weakref.WeakKeyDictionary()


def record_origin(model: torch.nn.Module, arch: str, source: str) -> None:
    """Remember that ``model`` is ``arch`` from ``source`` (timm or torchvision), for the files it is saved to."""
    _ORIGINS[model] = {"arch": arch, "source": source}
    ctx = getattr(model, CONTEXT_ATTR, None)
    if isinstance(ctx, ScaleContext):
        ctx.origin = dict(_ORIGINS[model])


def recorded_origin(model: torch.nn.Module) -> Dict[str, str]:
    """What :func:`record_origin` said of ``model`` (or of the model it was converted from), else ``{}``."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if isinstance(ctx, ScaleContext) and ctx.origin:
        return dict(ctx.origin)
    return dict(_ORIGINS.get(model, {}))

