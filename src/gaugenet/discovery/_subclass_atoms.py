"""Subclasses of atomic module types: atomic only where they are shown to compute what their
atomic base computes.

A rule knows what an `nn.LayerNorm`, an `nn.Linear` or an `nn.Embedding` computes; a
subclass may compute something else under the same name (Nemotron's `LayerNorm1P` applies
the gain `1 + w`, OPT's positional embedding looks up `cumsum(mask) + 2`, Gemma's
embedding multiplies by `√d`). The class is no proof, so a module whose type is a strict
subclass of an atomic type stays whole only when a numerical check shows that its
`forward` is the base's function of its own parameters: on a float64 copy whose floating
parameters are replaced by random values (so that an offset such as `1 + w`, or a zero
bias, cannot pass for the base's use of `w`), called with the inputs the module receives
in the model's run on the example inputs and with random floating inputs of the same
shapes, its outputs must equal those of the same copy with its class set to the base
(every method then the base's own). Any difference, or an exception (another signature),
and the module is traced into like any other, where the rules see its operations.

The verdicts hold for one discovery (`checked_subclasses`, a context); outside one, or on
the meta device (no values), a strict subclass is never atomic.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._inputs import Call

__all__ = ["RTOL", "atomic_base", "checked_subclasses", "computes_base", "same_function"]

#: relative tolerance of the comparison: both sides evaluate in float64, the same function
#: in at most a different order of operations (rounding of order `n ε ≈ 1e-14` for the
#: layer sizes concerned); a different function of random parameters differs by order 1
RTOL = 1e-9

#: calls of one module compared (a module called more often is a tie; its first calls
#: suffice to tell its function)
_CALLS = 4

_VERDICTS: contextvars.ContextVar[dict[int, bool] | None] = contextvars.ContextVar(
    "gaugenet_subclass_atoms", default=None
)


def atomic_base(m: nn.Module, atoms: tuple[type[nn.Module], ...]) -> type[nn.Module] | None:
    """The atomic type `m` strictly subclasses (the nearest in its method resolution
    order), or `None` when its type is atomic itself or subclasses none."""
    if type(m) in atoms:
        return None
    return next((c for c in type(m).__mro__[1:] if c in atoms), None)


def computes_base(m: nn.Module) -> bool:
    """Whether the current discovery has shown that `m` computes its atomic base's
    function (`False` outside a discovery, or for a module not checked)."""
    verdicts = _VERDICTS.get()
    return bool(verdicts and verdicts.get(id(m), False))


@contextlib.contextmanager
def checked_subclasses(
    model: nn.Module, call: Call | None, atoms: tuple[type[nn.Module], ...]
) -> Iterator[dict[int, bool]]:
    """Within the context, `computes_base` answers for every module of `model` whose type
    strictly subclasses one of `atoms`: checked on `model` run on `call` (`None`, or a
    model on the meta device: none is shown). Yields the verdicts by module id."""
    verdicts = _check(model, call, atoms)
    token = _VERDICTS.set(verdicts)
    try:
        yield verdicts
    finally:
        _VERDICTS.reset(token)


def _check(
    model: nn.Module, call: Call | None, atoms: tuple[type[nn.Module], ...]
) -> dict[int, bool]:
    subs = {id(m): (m, b) for m in model.modules() if (b := atomic_base(m, atoms)) is not None}
    if not subs:
        return {}
    verdicts = dict.fromkeys(subs, False)
    if call is None or any(p.is_meta for p in model.parameters()):
        return verdicts
    calls = _record(model, call, [m for m, _ in subs.values()])
    for key, (m, base) in subs.items():
        seen = calls.get(key, [])
        verdicts[key] = bool(seen) and all(same_function(m, base, a, k) for a, k in seen)
    return verdicts


def _record(model: nn.Module, call: Call, mods: list[nn.Module]) -> dict[int, list[Call]]:
    """The inputs each of `mods` receives when `model` runs on `call` (its first calls)."""
    calls: dict[int, list[Call]] = {}

    def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen = calls.setdefault(id(m), [])
        if len(seen) < _CALLS:
            seen.append(_detached((args, kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    args, kwargs = call
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # a model the example inputs do not run: nothing is shown
        return {}
    finally:
        for h in handles:
            h.remove()
    return calls


def same_function(m: nn.Module, base: type[nn.Module], args: tuple, kwargs: dict) -> bool:
    """Whether `m`'s `forward` and `base`'s compute the same outputs on a float64 copy of
    `m` with random floating parameters, on `args, kwargs` (floating tensors in float64)
    and on random floating inputs of the same shapes."""
    gen = torch.Generator().manual_seed(0)
    try:
        mine = copy.deepcopy(m).to(torch.float64)
    except Exception:  # a module that cannot be copied cannot be checked
        return False
    with torch.no_grad():
        for p in mine.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    theirs = copy.deepcopy(mine)
    theirs.__class__ = base
    for a, k in (_float64((args, kwargs), None), _float64((args, kwargs), gen)):
        try:
            with torch.no_grad():
                out, ref = mine.forward(*a, **k), theirs.forward(*a, **k)
        except Exception:  # another signature, or inputs the base refuses
            return False
        if not _close(out, ref):
            return False
    return True


def _close(out: Any, ref: Any) -> bool:
    """Equal structure, and tensors equal up to `RTOL` of the reference's largest entry."""
    if isinstance(out, Tensor) or isinstance(ref, Tensor):
        if not (isinstance(out, Tensor) and isinstance(ref, Tensor)):
            return False
        if out.shape != ref.shape or out.dtype != ref.dtype:
            return False
        if not out.is_floating_point():
            return bool(torch.equal(out, ref))
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        return bool(((out - ref).abs() <= RTOL * max(scale, 1e-300)).all())
    if isinstance(out, (tuple, list)) and isinstance(ref, (tuple, list)):
        return len(out) == len(ref) and all(_close(a, b) for a, b in zip(out, ref))
    return type(out) is type(ref) and out == ref


def _detached(call: Call) -> Call:
    args, kwargs = call
    det = lambda x: x.detach().clone() if isinstance(x, Tensor) else x  # noqa: E731
    return tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()}


def _float64(call: Call, gen: torch.Generator | None) -> Call:
    """Floating tensors of `call` in float64 (random ones of the same shapes with `gen`)."""

    def f(x: Any) -> Any:
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            return x
        if gen is None:
            return x.to(torch.float64)
        return torch.randn(x.shape, generator=gen, dtype=torch.float64)

    args, kwargs = call
    return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}
