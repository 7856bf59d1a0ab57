"""Every factor checked on the example inputs before `symmetries` returns.

A factor is kept when, on the example inputs,

- a random element (`sample()` at scale 0.5; random permutations included), and
- for a continuous factor, a small step `exp(ε ξ)` along a random algebra direction `ξ`
  (`ε = 1e-3`, so a break of first order shows as a relative change of about `ε`),

change every floating output by less than the tolerance (relative, `max|Δy| / max|y|`),
and acting by the element and then by its inverse gives the parameters back (relative
`1e-9`).

Precision: the check runs in float64 (a float32 or half model is checked on a float64
copy), and casts down inside the model (a softmax or an RMSNorm variance cast to float32,
...) are kept in float64 (`keep_float64`) unless the model then fails or computes something
else. Operations that still compute in a lower precision are seen while the model runs, and
the tolerance is then that of the lowest precision met (`TOLERANCES`); it is never below
100 times the
model's own float noise, measured as the output change when the parameters go through
`g` and back through `g⁻¹` (an identity up to rounding), and never above `1e-2`.

All factors are first checked together (one random element of each at once); only when
that fails is each checked on its own, then the survivors together again, adding them one
by one if needed. A factor that fails, or whose `sample`, `exp` or action raises, is
dropped and named among the breakers as an internal error (`INTERNAL_ERROR` starts the
reason): discovery claimed a symmetry that the model does not have.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .._float64_kernels import float64_kernels
from .._invariance import _flat_outputs, cast_floats
from ..groups import AbstractFactor, Breaker, GaugeGroup, PermutationFactor, TranslationFactor
from ..groups._base import State
from ..groups._group import model_state
from ..groups._offset import LayerNormOffsetFactor
from ._float64 import keep_float64
from ._inputs import Call

__all__ = ["INTERNAL_ERROR", "TOLERANCES", "self_check"]

#: relative output tolerance by the lowest floating precision met while the model runs
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 5e-2,
    torch.bfloat16: 5e-2,
}
#: how every self-check breaker's reason begins
INTERNAL_ERROR = "internal error"
_STEP = 1e-3
_NOISE_FACTOR = 100.0
#: the tolerance never exceeds this, whatever the noise (a factor must keep 2 digits)
_MAX_TOL = 1e-2
#: largest relative parameter change under `g` then `g⁻¹` (float64 rounding)
_ROUNDTRIP = 1e-9


class _Precisions(TorchDispatchMode):
    """Records the floating dtypes of every result computed while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.is_floating_point():
                self.seen.add(t.dtype)
        return out


def _outputs(out: Any) -> list[Tensor]:
    return [t.detach() for t in _flat_outputs(out) if t.is_floating_point()]


def _error(ys: Sequence[Tensor], refs: Sequence[Tensor]) -> float:
    """Largest relative change over the outputs, each relative to its own largest entry (or
    to `1e-6` of the largest of all, for an output that is zero); `inf` for a non-finite or
    missing output."""
    if len(ys) != len(refs):
        return float("inf")
    scales = [float(r.abs().max()) if r.numel() else 0.0 for r in refs]
    floor = max(1e-6 * max(scales, default=0.0), 1e-300)
    worst = 0.0
    for y, r, scale in zip(ys, refs, scales):
        if y.shape != r.shape or not torch.isfinite(y).all():
            return float("inf")
        if r.numel():
            worst = max(worst, float((y - r).abs().max()) / max(scale, floor))
    return worst


def _distance(pairs: Sequence[tuple[Tensor, Tensor]]) -> float:
    """`max|a − b| / max|b|` over all pairs `(a, b)` together (NaN when an `a` is not finite:
    it then fails every `<`)."""
    pairs = [(a, b) for a, b in pairs if b.numel()]
    if not pairs:
        return 0.0
    scale = max(float(b.abs().max()) for _, b in pairs)
    return max(float((a - b).abs().max()) for a, b in pairs) / max(scale, 1e-300)


class _Checker:
    """The float64 model, its outputs on the inputs, and the tolerance."""

    def __init__(
        self, model: nn.Module, call: Call, gen: torch.Generator, *, force64: bool = True
    ) -> None:
        f64 = all(p.dtype == torch.float64 for p in model.parameters() if p.is_floating_point())
        self.model = model if f64 else copy.deepcopy(model).double()
        self.args, self.kwargs = cast_floats(call, torch.float64)
        self.state = model_state(self.model)
        # names of one shared tensor (tied weights): the first is passed, the rest must agree
        groups: dict[int, list[str]] = {}
        for k, v in [
            *self.model.named_parameters(remove_duplicate=False),
            *self.model.named_buffers(remove_duplicate=False),
        ]:
            groups.setdefault(id(v), []).append(k)
        self.ties = [names for names in groups.values() if len(names) > 1]
        self.gen = gen
        self.force64 = False
        if force64:  # float64 throughout, unless the model then fails or computes otherwise
            loose = self._outputs(self.state)
            self.force64 = True
            try:
                forced = self._outputs(self.state)
                self.force64 = _error(forced, loose) < 1e-3
            except Exception:
                self.force64 = False
        with _Precisions() as rec:
            self.ref = self._outputs(self.state)
        low = max(rec.seen or {torch.float64}, key=lambda d: torch.finfo(d).eps)
        self.tol = TOLERANCES.get(low, 5e-2)
        self.noise: float | None = None

    def _outputs(self, state: State) -> list[Tensor]:
        state = dict(state)
        for names in self.ties:
            for k in names[1:]:
                del state[k]
        with (
            torch.no_grad(),
            float64_kernels(),
            keep_float64() if self.force64 else contextlib.nullcontext(),
        ):
            out = torch.func.functional_call(self.model, state, self.args, self.kwargs)
        return _outputs(out)

    def error(self, state: State) -> float:
        """Largest relative output change; `inf` when tied names got different values."""
        for names in self.ties:
            if any(not torch.equal(state[names[0]], state[k]) for k in names[1:]):
                return float("inf")
        return _error(self._outputs(state), self.ref)

    def sample(self, f: AbstractFactor) -> Tensor:
        """A random element; for a discrete factor one that is not the identity (redrawn up
        to 20 times: a random permutation of 2 items is the identity half of the time)."""
        a = f.sample(self.gen)
        for _ in range(20 if f.discrete else 0):
            if not torch.equal(a, f.identity(a.dtype)):
                break
            a = f.sample(self.gen)
        return a

    def roundtrip(self, group: GaugeGroup, g: dict[str, Tensor]) -> tuple[State, float]:
        """The state acted on by `g` then `g⁻¹`, and its largest relative distance to the
        original parameters (rounding only, for a group action)."""
        inv = group.inverse(g)
        back = group.act_state(group.act_state(self.state, g), {k: inv[k] for k in g})
        keys = [k for k in {p for f in group.factors if f.name in g for p in f.params()}]
        keys = [k for k in keys if self.state[k].is_floating_point()]
        dist = _distance([(back[k], self.state[k]) for k in keys])
        return back, dist

    def failure(self, group: GaugeGroup, factors: Sequence[AbstractFactor]) -> str | None:
        """Why the factors together do not keep the outputs, or `None` when they do."""
        try:
            g = {f.name: self.sample(f) for f in factors}
            err = self.error(group.act_state(self.state, g))
            back, dist = self.roundtrip(group, g)
        except Exception as exc:  # sample or act raised: the factor is unusable
            return f"raised {type(exc).__name__}: {exc}"
        if not dist < _ROUNDTRIP:
            return f"acting by g and then by its inverse moves the parameters by {dist:.2e}"
        if self.noise is None:  # once: the model's own float noise sets the floor
            self.noise = self.error(back)
            self.tol = min(max(self.tol, _NOISE_FACTOR * self.noise), _MAX_TOL)
        if not err < self.tol:
            return f"a random element changes the outputs by {err:.2e} (tolerance {self.tol:.0e})"
        cont = [f for f in factors if not f.discrete and f.dim > 0]
        if not cont:
            return None
        try:
            step = {
                f.name: f.exp(_STEP * torch.randn(f.dim, generator=self.gen, dtype=torch.float64))
                for f in cont
            }
            err = self.error(group.act_state(self.state, step))
        except Exception as exc:
            return f"raised {type(exc).__name__} along a tangent: {exc}"
        if not err < self.tol:
            return (
                f"a step {_STEP:.0e} along a random tangent changes the outputs by {err:.2e} "
                f"(tolerance {self.tol:.0e})"
            )
        return None


def _prune(factors: Sequence[AbstractFactor], dropped: set[str]) -> list[AbstractFactor]:
    """The factors without `dropped`, and without declarations that refer to them."""
    out = []
    for f in factors:
        if f.name in dropped:
            continue
        if isinstance(f, PermutationFactor) and any(n in dropped for n, _ in f.conjugates):
            f = dataclasses.replace(
                f, conjugates=tuple(c for c in f.conjugates if c[0] not in dropped)
            )
        if isinstance(f, TranslationFactor) and any(
            c[0] in dropped for c in (*f.scaled_by, *f.moved_by)
        ):
            f = dataclasses.replace(
                f,
                scaled_by=tuple(c for c in f.scaled_by if c[0] not in dropped),
                moved_by=tuple(c for c in f.moved_by if c[0] not in dropped),
            )
        elif isinstance(f, LayerNormOffsetFactor) and any(c[0] in dropped for c in f.moved_by):
            f = dataclasses.replace(f, moved_by=tuple(c for c in f.moved_by if c[0] not in dropped))
        out.append(f)
    return out


def _subgroup(group: GaugeGroup, dropped: set[str], breakers: list[Breaker]) -> GaugeGroup:
    factors = _prune(group.factors, dropped)
    return GaugeGroup(tuple(factors), tuple(group.breakers) + tuple(breakers), group.param_names)


def _breaker(f: AbstractFactor, why: str) -> Breaker:
    return Breaker(
        f.name,
        f"{INTERNAL_ERROR}: discovery offered this {f.kind} factor, but {why} on the example "
        "inputs; dropped",
    )


def self_check(model: nn.Module, call: Call, group: GaugeGroup, *, seed: int = 0) -> GaugeGroup:
    """`group` without the factors that fail on the inputs `call`, which are named among
    the breakers (see the module docstring). `model` is left as it was."""
    if not group.factors:
        return group
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        checker = _Checker(model, call, torch.Generator().manual_seed(seed))
        return _isolate(group, checker.failure)
    finally:
        for m, was in modes:
            m.training = was


def _isolate(
    group: GaugeGroup,
    failure: Callable[[GaugeGroup, Sequence[AbstractFactor]], str | None],
) -> GaugeGroup:
    if failure(group, group.factors) is None:
        return group
    dropped: set[str] = set()
    breakers: list[Breaker] = []
    for f in group.factors:
        why = failure(group, [f])
        if why is not None:
            dropped.add(f.name)
            breakers.append(_breaker(f, why))
    group = _subgroup(group, dropped, breakers)
    if failure(group, group.factors) is None:
        return group
    kept: list[AbstractFactor] = []
    dropped, breakers = set(), []
    for f in group.factors:  # each on its own passes: add them one by one
        why = failure(group, [*kept, f])
        if why is None:
            kept.append(f)
        else:
            dropped.add(f.name)
            breakers.append(_breaker(f, f"together with the factors before it, {why}"))
    return _subgroup(group, dropped, breakers)
