"""Scale-Specific BatchNorm (S-BN): one copy of a batch-norm layer per training scale.

Each branch is a full copy of the original layer (its class, affine parameters, running
statistics, and for timm's ``BatchNormAct2d`` its activation and drop), so exporting a scale
is just taking its branch back out. The model's :class:`~sct_convert.context.ScaleContext`
says which branch runs.
"""

import copy
from typing import Dict, List, Sequence, Tuple, Type

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .context import ScaleContext


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
    """True for every layer S-BN replaces: any ``_BatchNorm`` subclass and the frozen BNs."""
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


def scale_specific_forward(sbn: "ScaleSpecificBatchNorm", x: torch.Tensor) -> torch.Tensor:
    """Route (on the entry layer) and run the active branch. A leaf for FX, so routing survives tracing."""
    context = sbn.context
    if sbn.routes:
        context.route_input(x)
    branch = sbn.branch_modules[context.active_key]
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


# Tracers record this call as one node instead of baking in the branch active at trace time.
torch.fx.wrap("scale_specific_forward")


class ScaleSpecificBatchNorm(nn.Module):
    entry_sizes: List[List[int]]  # TorchScript needs the element type of the (possibly empty) list

    """Per-scale copies of one batch-norm layer; the shared ``context`` selects the copy.

    ``norm`` is a batch-norm layer, or a module that holds nothing but batch-norm state and
    applies it with ``F.batch_norm`` (the conversion pass checks which). A training forward at
    scale ``s`` updates only branch ``s``'s running statistics and only its parameters receive
    gradient, because the other branches are not run.
    """

    def __init__(self, norm: nn.Module, keys: Sequence[str], context: ScaleContext) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({key: copy.deepcopy(norm) for key in keys})
        # The ModuleDict's own dict, reached without nn.Module.__getattr__ on the hot path.
        self.branch_modules = self.branches._modules
        # A plain attribute, not a submodule: the context holds no tensors and is shared.
        self.context = context
        self.routes = False  # True on the model's entry layer: its input picks the branch
        # TorchScript cannot call back into the Python context, so a scripted model routes
        # with these: the entry layer's sizes per scale, and one index tensor shared by every
        # S-BN of the model (a plain attribute, so it stays on the CPU under .to(device)).
        self.entry_sizes = []
        self.unknown_error = context.unknown_scale == "error"
        self.script_state = context.script_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return scale_specific_forward(self, x)

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routes:
            h, w = x.shape[-2], x.shape[-1]
            index = -1
            for i, hw in enumerate(self.entry_sizes):
                if hw[0] == h and hw[1] == w:
                    index = i
            if index < 0:
                if self.unknown_error:
                    raise ValueError("sct_convert: input size matches none of the model's scales")
                best = -1
                for i, hw in enumerate(self.entry_sizes):
                    gap = abs(h * w - hw[0] * hw[1])
                    if best < 0 or gap < best:
                        best, index = gap, i
            self.script_state[0] = index
        active = int(self.script_state[0])
        out = x
        i = 0
        for branch in self.branches.values():
            if i == active:
                out = branch(x)
            i += 1
        return out

    def branch(self, key: str) -> nn.Module:
        return self.branches[key]

    def extra_repr(self) -> str:
        first = next(iter(self.branches.values()))
        return f"{type(first).__name__}, scales=[{', '.join(self.branches.keys())}]"

    def __repr__(self) -> str:
        # One line instead of M identical branch reprs keeps print(model) readable.
        return f"{type(self).__name__}({self.extra_repr()})"
