"""Scale-Specific BatchNorm (S-BN): one copy of a batch-norm layer per training scale.

Each branch is a full copy of the original layer (its class, affine parameters, running
statistics, and for timm's ``BatchNormAct2d`` its activation and drop), so exporting a scale
is just taking its branch back out. Which branch runs is the current call's route
(:mod:`sct_convert.core.context`), never state stored on the layer.
"""

import copy
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .route import resolve
from .context import ScaleContext
from .rule import Blend, script_choose


def _frozen_batch_norm_types() -> Tuple[Type[nn.Module], ...]:
    types = []
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d

        types.append(FrozenBatchNorm2d)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        from timm.layers import FrozenBatchNormAct2d  # timm's FrozenBatchNorm2d is torchvision's

        types.append(FrozenBatchNormAct2d)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(dict.fromkeys(types))


#: Frozen batch norms are converted like any other: every branch is a frozen copy (buffers,
#: no gradient), so a converted frozen-BN backbone keeps its frozen behaviour per scale and
#: :func:`sct_convert.calibrate` can still re-estimate each branch's statistics.
FROZEN_BATCH_NORM_TYPES: Tuple[Type[nn.Module], ...] = _frozen_batch_norm_types()


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``convert`` branches this layer.

    Args:
        module: any module.

    Returns:
        True for every ``_BatchNorm`` subclass (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's
        ``BatchNormAct2d``) and the frozen batch norms in :data:`FROZEN_BATCH_NORM_TYPES`.
    """
    return isinstance(module, (_BatchNorm,) + FROZEN_BATCH_NORM_TYPES)


def _eval_shortcut_types() -> Dict[Type[nn.Module], Tuple[int, ...]]:
    types: Dict[Type[nn.Module], Tuple[int, ...]] = {
        nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
    try:
        from timm.layers import BatchNormAct2d

        types[BatchNormAct2d] = (4,)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return types


#: Exact classes whose eval-mode forward is one ``F.batch_norm`` on their running statistics
#: (then ``drop`` and ``act`` for timm's BatchNormAct2d), with the input ranks they accept.
_EVAL_SHORTCUT_TYPES = _eval_shortcut_types()


def _graph_routable(branch: nn.Module) -> bool:
    """Branches whose eval forward is ``F.batch_norm`` on their own state (then drop and act)."""
    return isinstance(branch, (_BatchNorm,) + FROZEN_BATCH_NORM_TYPES)


def _traced_state(module: nn.Module, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``module.<name>``; under torch.fx a ``get_attr`` node even for buffers, never a constant.

    (Tracers that do not proxy buffers would bake a snapshot of the statistics into the graph.)
    """
    value = getattr(module, name, None)
    if value is None or not isinstance(x, torch.fx.Proxy) or isinstance(value, torch.fx.Proxy):
        return value
    path = x.tracer.path_of_module(module)
    return x.tracer.create_proxy("get_attr", f"{path}.{name}" if path else name, (), {})


def blended_state(low: nn.Module, high: nn.Module, t: Union[float, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Two branches' parameters and buffers blended: ``(1 - t) * low + t * high`` for floating
    tensors, a copy of ``low``'s for the rest (``num_batches_tracked``). The one rule for an
    in-between size, whether a forward blends on the fly or ``sct.add_scale`` writes a branch."""
    highs = dict(high.named_parameters()) | dict(high.named_buffers())
    return {name: torch.lerp(tensor, highs[name], t) if tensor.is_floating_point() else tensor.clone()
            for name, tensor in list(low.named_parameters()) + list(low.named_buffers())}


class ScaleSpecificBatchNorm(nn.Module):
    """Per-scale copies of one batch-norm layer; the current call's route selects the copy.

    ``norm`` is a batch-norm layer, or a module that holds nothing but batch-norm state and
    applies it with ``F.batch_norm`` (the conversion pass checks which). A training forward at
    scale ``s`` updates only branch ``s``'s running statistics and only its parameters receive
    gradient, because the other branches are not run.

    In eager mode the route is a Python int and the layer calls that branch. Traced with a
    symbolic input size (``torch.export``, ``torch.compile(dynamic=True)``, FX in eval mode)
    the route is an index tensor and the layer gathers that branch's statistics and affine
    parameters in the graph (``index_select`` on the stacked branches, then ``F.batch_norm``),
    so one graph serves every scale.

    Args:
        norm: the layer to branch; each branch starts as an exact copy.
        keys: one branch name per scale (``scale_key`` of its size).
        context: the model's :class:`ScaleContext`, shared by all its S-BN layers.
    """

    sizes_here: List[List[int]]  # TorchScript needs the element type of a possibly empty list

    def __init__(self, norm: nn.Module, keys: Sequence[str], context: ScaleContext) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({key: copy.deepcopy(norm) for key in keys})
        # A plain attribute, not a submodule: the context holds no tensors and is shared.
        self.context = context
        # This layer's input size at each scale (measured by convert; empty when that cannot
        # tell the scales apart). Only TorchScript routes by it: scripted code cannot read the
        # call's route, e.g. a scripted FX graph that keeps a module holding S-BNs as a leaf.
        self.sizes_here = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        route = resolve(self.context)
        if route is None:
            raise RuntimeError(
                "sct_convert: a scale-specific batch norm ran without a route: no call of the "
                f"converted model (and no call through its entry layer '{self.context.entry_name}') "
                "chose a branch in this thread; call the model, or run the part under "
                "sct.scale(model, s)"
            )
        index = route.branch
        if isinstance(index, int):
            return self._branch_forward(x, index)
        if isinstance(index, Blend):
            return self._blend_forward(x, index)
        return self.graph_forward(x, index)

    def _branch_forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        # The ModuleDict's own dict, not nn.Module.__getattr__: this is the hot path.
        branch = self._modules["branches"]._modules[self.context.keys[index]]
        if isinstance(x, torch.fx.Proxy):  # a module call, so FX records the branch, not its internals
            return branch(x)
        # Small-batch GPU inference is bound by Python, not kernels: in eval mode, make the one
        # F.batch_norm call the branch's forward would make, without the Python around it.
        if not branch.training and x.dim() in _EVAL_SHORTCUT_TYPES.get(type(branch), ()):
            buffers = branch._buffers
            mean, var = buffers["running_mean"], buffers["running_var"]
            if mean is not None and var is not None:
                params = branch._parameters
                out = F.batch_norm(x, mean, var, params["weight"], params["bias"], False, 0.0, branch.eps)
                modules = branch._modules
                if "act" in modules:  # BatchNormAct2d
                    out = modules["act"](modules["drop"](out))
                return out
        # The branch's forward, not its __call__: hooks belong on the S-BN layer.
        return branch.forward(x)

    def _blend_forward(self, x: torch.Tensor, blend: Blend) -> torch.Tensor:
        """The low branch run on every floating tensor lerped toward the high branch's.

        In train mode the batch statistics normalise and the blended running statistics are
        temporaries: neither branch's statistics change, both get gradient through the lerp.
        """
        keys = self.context.keys
        low, high = self.branches[keys[blend.low]], self.branches[keys[blend.high]]
        return torch.func.functional_call(low, blended_state(low, high, blend.t), (x,))

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """TorchScript: route by this layer's own input size (exact, else nearest by pixels)."""
        if len(self.sizes_here) == 0:
            raise RuntimeError("sct_convert: this scale-specific batch norm cannot tell the scales "
                               "apart from its own input; script the converted model itself")
        index = script_choose(x.shape[-2], x.shape[-1], self.sizes_here)
        out = x
        for i, branch in enumerate(self.branches.values()):
            if i == index:
                out = branch(x)
        return out

    def graph_forward(self, x: torch.Tensor, index: object) -> torch.Tensor:
        """The branch picked by a 0-d index tensor, or the blend ``lerp(low, high, t)`` given by
        ``(low, high, t)`` tensors, with no Python branching (traced eval)."""
        branches = [self.branches[k] for k in self.context.keys]
        first = branches[0]
        if first.training:
            raise RuntimeError(
                "sct_convert: routing by a symbolic input size works in eval mode only; in train "
                "mode trace with concrete sizes, or run each scale under sct.scale(model, s)"
            )
        if not all(type(b) is type(first) and _graph_routable(b) for b in branches):
            raise RuntimeError(
                f"sct_convert: a {type(first).__name__} branch cannot be picked inside a graph; "
                "export one scale (sct.extract(model, s)) instead"
            )
        rows = [i.reshape(1) for i in index[:2]] if isinstance(index, tuple) else [index.reshape(1)]

        def pick(name: str) -> Optional[torch.Tensor]:
            tensors = [_traced_state(b, name, x) for b in branches]
            if tensors[0] is None:
                return None
            stacked = torch.stack(tensors)
            chosen = [stacked.index_select(0, row).squeeze(0) for row in rows]
            return chosen[0] if len(chosen) == 1 else torch.lerp(chosen[0], chosen[1], index[2].to(chosen[0].dtype))

        mean, var = pick("running_mean"), pick("running_var")
        out = F.batch_norm(x, mean, var, pick("weight"), pick("bias"), mean is None, 0.0, first.eps)
        drop, act = getattr(first, "drop", None), getattr(first, "act", None)
        if isinstance(drop, nn.Module) and isinstance(act, nn.Module):  # BatchNormAct2d
            out = act(drop(out))
        return out

    def extra_repr(self) -> str:
        first = next(iter(self.branches.values()))
        return f"{type(first).__name__}, scales=[{', '.join(self.branches.keys())}]"

    def __repr__(self) -> str:
        # One line instead of M identical branch reprs keeps print(model) readable.
        return f"{type(self).__name__}({self.extra_repr()})"

