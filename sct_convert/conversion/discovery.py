"""Discovery: every place a batch norm is applied, audited before anything is rewritten.

The model is traced with torch.fx (batch norms and timm's no-trace modules as leaves) to audit
every call site, including functional ``F.batch_norm`` on module parameters; a model that does
not trace is audited from its module tree. A batch norm that cannot be branched is a
:class:`ConversionError` naming it, never a silent skip.
"""
from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..core.batchnorm import is_batch_norm
from ..errors import ConversionError

logger = logging.getLogger(__name__)

_FUNCTIONAL_BATCH_NORMS = {F.batch_norm, torch.batch_norm}


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
    except Exception as e:  # noqa: BLE001 - FX runs the model's own forward on proxies: it fails in any type
        # The module-tree audit is the stricter one (it refuses modules that may apply batch norm
        # functionally), so this fallback never converts less; the report and the log say it happened.
        report.traced = False
        report.trace_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.info("torch.fx cannot trace %s (%s): batch norms audited from the module tree",
                    type(model).__name__, report.trace_error)
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


