"""Linking the kernels of query and key normalizations (`_head_norm_kernel.py`) with the rest
of the group, once it is known.

- Overlap: where the projection reads a LayerNorm whose own kernel factor (`_kernel.py`)
  holds all of a block's rows, that factor already moves those rows along `1/γ'`, which is
  the block's `a ∝ 1`: the block then takes `a` in `1^⊥`, so that no direction is counted
  twice.
- Commutation: the factor claims to commute with every other factor that touches its
  parameters (the projection, and the LayerNorm it reads), except the stream rotations,
  which move it as declared in `moved_by`; both are checked, not assumed: random elements
  of both, applied to the model's parameters in float64 in either order (with the declared
  move), must give the same parameters (relative `1e-10`). A factor that fails is left out
  (the group then misses its directions, which `certify` reports) rather than composed
  wrongly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..groups import GaugeGroup, OrthogonalFactor
from ..groups._base import State
from ..groups._group import model_state
from ._head_norm_kernel import HeadNormKernelFactor
from ._kernel import LayerNormKernelFactor

__all__ = ["link_head_norm_kernels"]

#: relative parameter difference under the two orders below which factors commute
_COMMUTE = 1e-10


def link_head_norm_kernels(factors: list, model: nn.Module) -> list:
    """`factors` with every `HeadNormKernelFactor` reduced where a LayerNorm kernel holds its
    rows, and left out where it does not commute with a factor sharing its parameters."""
    if not any(isinstance(f, HeadNormKernelFactor) for f in factors):
        return factors
    state = {k: v.double() if v.is_floating_point() else v for k, v in model_state(model).items()}
    out, seen = [], set()
    for f in factors:
        if isinstance(f, HeadNormKernelFactor):
            key = (f.kernel.weight, tuple(f.kernel.rows.reshape(-1).tolist()))
            if key in seen:  # one norm read by several cores: kept once
                continue
            seen.add(key)
            f = _linked(_reduced(f, factors), factors, state)
            if f is None:
                continue
        out.append(f)
    return out


def _reduced(f: HeadNormKernelFactor, factors: list) -> HeadNormKernelFactor:
    """`f` with `a ∈ 1^⊥` on the blocks whose rows a kernel factor of the same LayerNorm
    holds (in one slot on the same weight, along the same axis)."""
    t = f.kernel
    if t.ln is None:
        return f
    slots = [
        s
        for g in factors
        if isinstance(g, LayerNormKernelFactor) and g.kernel.ln == t.ln
        for s in g.kernel.slots
        if s.weight == t.weight and s.out_axis == t.out_axis
    ]
    held = torch.tensor(
        [any(s.start <= int(r.min()) and int(r.max()) < s.stop for s in slots) for r in t.rows],
        dtype=torch.bool,
    )
    term = dataclasses.replace(t, complement=held)
    return dataclasses.replace(f, n=sum(term.sizes()), terms=(term,))


def _linked(f: HeadNormKernelFactor, factors: list, state: State) -> HeadNormKernelFactor | None:
    """`f` with the stream rotations it does not commute with declared in `moved_by` (the
    `z` of every block turns by `Bᵀ Qᵀ B`, `_head_norm_kernel.py`), or `None` when some
    factor sharing its parameters neither commutes with it nor moves it as declared."""
    f = dataclasses.replace(f, moved_by=())  # declared afresh
    gen = torch.Generator().manual_seed(0)
    mine = set(f.params())
    a = f.sample(gen)
    for g in factors:
        if g is f or not mine & set(g.params()):
            continue
        b = g.sample(gen)
        if _moves(f, g, a, b, state, a):
            continue
        if not (isinstance(g, OrthogonalFactor) and f.kernel.ln is not None):
            return None
        moved = tuple((g.name, "Tc", o) for o in f.kernel.starts())
        trial = dataclasses.replace(f, moved_by=(*f.moved_by, *moved))
        pair = GaugeGroup((g, trial), (), ())
        after = pair._rescale_shift(trial, a, {g.name: b}, scaled=False)
        if not _moves(trial, g, a, b, state, after):
            return None
        f = trial
    return f


def _moves(f, g, a: Tensor, b: Tensor, state: State, after: Tensor) -> bool:
    """Acting by `f(a)` then `g(b)` equals `g(b)` then `f(after)` (relative `_COMMUTE`)."""
    try:
        one = g.apply(f.apply(state, a), b)
        two = f.apply(g.apply(state, b), after)
    except (KeyError, RuntimeError, IndexError):
        return False
    return all(_close(one[k], two[k]) for k in one if one[k].is_floating_point())


def _close(x: Tensor, y: Tensor) -> bool:
    ref = max(float(x.abs().max()) if x.numel() else 0.0, 1.0)
    return x.shape == y.shape and float((x - y).abs().max()) <= _COMMUTE * ref
