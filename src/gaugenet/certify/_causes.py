"""Explaining hidden redundancy: ReLU units that are dead or always active on the inputs,
weights tied between layers, and LayerNorms whose `eps` is too small to break the scaling of
their inputs at the rank tolerance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._jacobian import as_tuple

__all__ = [
    "layernorm_causes",
    "lookup_causes",
    "relu_causes",
    "small_eps_norms",
    "tied_causes",
]

_RELUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


def _per_unit(x: Tensor, last: bool = False) -> tuple[Tensor, Tensor]:
    """`(never_positive, always_positive)` per unit: channel axis 1 for ≥ 3-d tensors
    (convolutions) unless `last`, the last axis otherwise (linear layers)."""
    if x.ndim >= 3 and not last:
        x = x.movedim(1, -1)
    flat = x.reshape(-1, x.shape[-1])
    return (flat <= 0).all(0), (flat > 0).all(0)


def _watch_inputs(
    model: nn.Module,
    inputs: Any,
    types: tuple[type, ...],
    record: Callable[[str, nn.Module, Tensor], None],
) -> None:
    """Run `model` on `inputs`, calling `record(name, module, first_input)` for every
    module of one of `types` each time it runs."""
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, types):

            def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                record(name, mod, args[0].detach())

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*as_tuple(inputs))
    finally:
        for h in hooks:
            h.remove()


def relu_causes(model: nn.Module, inputs: Any) -> list[str]:
    """One line per ReLU-like module with units that are dead (never positive on the
    inputs: their incoming weights do not matter) or always active (the unit is linear on
    the inputs, so more than rescalings leave the outputs unchanged)."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    #: modules whose negative piece is not zero (PReLU, LeakyReLU): a unit never positive
    #: there is not dead but linear with the negative slope
    sloped: set[str] = set()

    def record(name: str, mod: nn.Module, x: Tensor, last: bool = False) -> None:
        if isinstance(mod, (nn.PReLU, nn.LeakyReLU)):
            sloped.add(name)
        dead, alive = _per_unit(x, last)
        if name in found:  # a module used twice: combine both uses
            d0, a0 = found[name]
            dead, alive = (d0 & dead, a0 & alive) if d0.shape == dead.shape else (d0, a0)
        found[name] = (dead, alive)

    _watch_inputs(model, inputs, _RELUS, record)
    for name, x, last in _functional_relu_inputs(model, inputs):
        record(name, model, x, last)
    lines = []
    for name, (dead, alive) in found.items():
        if dead.any():
            idx = dead.nonzero().reshape(-1).tolist()
            what = "on the negative slope only" if name in sloped else "dead"
            lines.append(f"{name}: {len(idx)} unit(s) {what} on the inputs (e.g. {idx[:5]})")
        if alive.any():
            idx = alive.nonzero().reshape(-1).tolist()
            lines.append(f"{name}: {len(idx)} unit(s) always active on the inputs (e.g. {idx[:5]})")
    return lines


_RELU_FUNCS = {F.relu, torch.relu, F.leaky_relu, F.relu_, F.prelu}


def _functional_relu_inputs(model: nn.Module, inputs: Any) -> list[tuple[str, Tensor, bool]]:
    """The inputs of ReLU-like *functions* (`F.relu`, `x.relu()`, ...), which forward hooks
    cannot see: `model` traced with `torch.fx` and interpreted, `(node name, input, units
    on the last axis)` per call (the last axis when a linear layer produced the input).
    Models that cannot be traced give none."""
    from ..discovery._trace import trace

    args = as_tuple(inputs)
    try:
        gm = trace(model, len(args))
    except Exception:  # untraceable: module hooks are all there is
        return []
    seen: list[tuple[str, Tensor, bool]] = []

    class _Watch(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            relu = (n.op == "call_function" and n.target in _RELU_FUNCS) or (
                n.op == "call_method" and n.target in ("relu", "relu_")
            )
            if relu:
                src = n.args[0]
                x = self.env[src] if isinstance(src, torch.fx.Node) else None
                if isinstance(x, Tensor):
                    last = src.op == "call_module" and isinstance(
                        gm.get_submodule(str(src.target)), nn.Linear
                    )
                    seen.append((n.name, x.detach(), last))
            return super().run_node(n)

    try:
        with torch.no_grad():
            _Watch(gm).run(*args)
    except Exception:
        return []
    return seen


def tied_causes(model: nn.Module) -> list[str]:
    """One line per parameter shared by several layers. Discovery drops every symmetry that
    touches a tied weight, yet some survive jointly: two layers `W` in a ReLU chain keep
    `W ↦ cW` with the biases and the next layer rescaled by powers of `c`."""
    users: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(name)
    return [
        f"{' = '.join(names)}: one weight tied across layers; symmetries that rescale the "
        "tied layers jointly are not discovered"
        for names in users.values()
        if len(names) > 1
    ]


def small_eps_norms(model: nn.Module, inputs: Any, rtol: float) -> dict[str, tuple[float, float]]:
    """`name: (eps, smallest input variance)` for every LayerNorm of `model` whose `eps` is
    below `rtol` times the smallest variance of its inputs on `inputs`."""
    found: dict[str, float] = {}

    def record(name: str, mod: nn.Module, x: Tensor) -> None:
        dims = tuple(range(-len(mod.normalized_shape), 0))
        var = float(x.double().var(dim=dims, unbiased=False).min())
        found[name] = min(found.get(name, var), var)

    _watch_inputs(model, inputs, (nn.LayerNorm,), record)
    out = {}
    for name, var in found.items():
        eps = float(model.get_submodule(name).eps)
        if eps < rtol * var:
            out[name] = (eps, var)
    return out


def layernorm_causes(model: nn.Module, inputs: Any, rtol: float) -> list[str]:
    """One line per LayerNorm whose `eps` is below `rtol` times the smallest variance of its
    inputs. `LN(c x) = LN(x)` up to `eps`, so scaling everything that feeds such a
    LayerNorm (every branch of its residual sum) moves the outputs by about `eps / σ²`
    relative, under the rank tolerance: a near-symmetry, which discovery does not offer
    (`_eps_cause` measures it when the Jacobian is at hand)."""
    return [
        f"{name}: eps = {eps:.0e} is below {rtol:.0e} of its inputs' variance (min "
        f"{var:.1e}): scaling all that feeds it is a symmetry up to eps, not offered"
        for name, (eps, var) in small_eps_norms(model, inputs, rtol).items()
    ]


def lookup_causes(model: nn.Module, inputs: Any, share: float = 0.25) -> list[str]:
    """One line per group of linear layers whose input rows take few distinct values on the
    inputs (at most `share` of its rows): on token inputs a layer fed only by the embedding
    (the first MLP of a parallel-residual block, say) sees one row per vocabulary entry, so
    it and what follows it token by token act as a table of that many rows, and parameters
    beyond what the table holds are redundant on every token input without being a
    symmetry."""
    found: dict[str, tuple[int, int]] = {}

    def record(name: str, mod: nn.Module, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        k = int(torch.unique(rows, dim=0).shape[0])
        n0, k0 = found.get(name, (0, 0))
        found[name] = (n0 + rows.shape[0], max(k0, k))

    _watch_inputs(model, inputs, (nn.Linear,), record)
    by_k: dict[int, list[str]] = {}
    for name, (n, k) in found.items():
        if k <= share * n:
            by_k.setdefault(k, []).append(name)
    return [
        f"{', '.join(names)}: inputs take only {k} distinct values on these inputs (a table "
        f"of {k} rows; parameters beyond it are redundant on such inputs, not symmetries)"
        for k, names in by_k.items()
    ]
