"""Capturing a model as a `torch.fx` graph, with the modules the analysis treats as atoms."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

from .._errors import UnsupportedModelError
from ._subclass_atoms import atomic_base, computes_base
from .rules import REGISTRY

__all__ = ["ATOMIC_MODULES", "atom_types", "is_atomic", "register_atomic", "trace"]

#: Module types never traced into: those of the atomic rules in `rules/` (the rules know
#: what they do).
ATOMIC_MODULES: tuple[type[nn.Module], ...] = REGISTRY.atomic_modules()

_EXTRA_ATOMS: list[type[nn.Module]] = []


def register_atomic(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare a module type atomic (analyzed as a whole by its own analyzer)."""
    if cls not in _EXTRA_ATOMS:
        _EXTRA_ATOMS.append(cls)
    return cls


def atom_types() -> tuple[type[nn.Module], ...]:
    """The atomic module types: the rules' and the registered ones."""
    return (*ATOMIC_MODULES, *_EXTRA_ATOMS)


def is_atomic(m: nn.Module) -> bool:
    """`m` is analyzed whole: it describes its own factors (`gauge_factors`), its type is
    atomic, or its type strictly subclasses an atomic one and the current discovery has
    shown that it computes that type's function (`_subclass_atoms.py`; the class alone is
    no proof: a subclass may override what it computes)."""
    if hasattr(m, "gauge_factors"):
        return True
    atoms = atom_types()
    if type(m) in atoms:
        return True
    return atomic_base(m, atoms) is not None and computes_base(m)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Atoms stay whole; so do torch's own layers without children (fx's default), but a
        torch layer built of other modules (`nn.TransformerEncoderLayer`) is traced into, so
        that the rules see its parts (where its control flow stops fx, `torch.export`
        captures the model instead)."""
        if is_atomic(m):
            return True
        if isinstance(m, nn.RMSNorm):  # its one `F.rms_norm` call is written out (`_rms_norm.py`)
            return False
        return super().is_leaf_module(m, module_qualified_name) and next(m.children(), None) is None


def _concrete_args(model: nn.Module, n_given: int) -> dict[str, Any] | None:
    """Defaults of `forward` parameters beyond the inputs given, fixed for tracing."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    out = {}
    for p in params[n_given:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out or None


def trace(model: nn.Module, n_inputs: int) -> fx.GraphModule:
    """`model` as an `fx.GraphModule` whose atoms are `ATOMIC_MODULES` and registered types.

    Raises `UnsupportedModelError` naming the cause when the model cannot be captured.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, n_inputs))
    except Exception as exc:  # fx raises many types; all mean "cannot capture"
        raise UnsupportedModelError(
            f"cannot capture {type(model).__name__} as a graph with torch.fx: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _aten_products(graph)
    return fx.GraphModule(tracer.root, graph)


def _aten_products(graph: fx.Graph) -> None:
    """`torch.addmm` / `torch.mm` calls (GPT-2's `Conv1D` as fx records it) as the aten ops
    `torch.export` records, which the rules and the linear-map queries read (`addmm` with
    `beta` or `alpha` is left as it is: its rule would not see the factors)."""
    products = ((torch.addmm, torch.ops.aten.addmm.default), (torch.mm, torch.ops.aten.mm.default))
    for n in graph.nodes:
        if n.op != "call_function" or n.kwargs:
            continue
        for fn, op in products:
            if n.target is fn:
                n.target = op


def default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Example inputs inferred from the first layer, for models that allow it."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features, dtype=m.weight.dtype),)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm)):
            break
    raise UnsupportedModelError(
        f"{type(model).__name__}: pass example_inputs; shapes cannot be inferred for a model "
        "that does not start with nn.Linear"
    )
