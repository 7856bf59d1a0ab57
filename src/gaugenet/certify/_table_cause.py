"""Layers fed by a table: on token inputs a layer that reads only the token's embedding (the
first MLP of a parallel-residual block, say) sees one input row per vocabulary entry, so it
and what follows it token by token act as a table of that many rows, and their parameters
beyond what the table holds are redundant on such inputs without being a symmetry.

Measured, not listed: the layers' inputs are made distinct (a small fixed random
perturbation of every row of their inputs, through hooks; small so that no ReLU unit
downstream changes side) and the Jacobian is formed again. The directions of `ker J` that
leave the kernel then are the table's (a token's embedding row changed along what the
norms after it ignore, and the table-fed MLP taking the change back, say); those that stay
(a symmetry discovery does not know) are not attributed to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._attribute import CauseSpace, span
from ._hooked import hooked, jacobian_on
from ._jacobian import FlatModel
from ._svd import svd

__all__ = ["table_cause", "table_fed"]

#: a layer is table-fed when its input rows take at most this share of distinct values
SHARE = 0.25
#: the perturbation that makes the rows distinct, relative to the inputs' spread
NOISE = 1e-3


def table_fed(fm: FlatModel, share: float = SHARE) -> dict[nn.Module, list[Tensor]]:
    """The modules of `fm.model` with parameters of their own whose (floating) first input,
    over all calls, has at most `share` of its rows (last axis) distinct; each with its
    inputs, one per call."""
    seen: dict[nn.Module, list[Tensor]] = {}
    mods = [m for m in fm.model.modules() if any(True for _ in m.parameters(recurse=False))]

    def keep(mod: nn.Module, call: int, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.is_floating_point() and x.ndim >= 2:
            seen.setdefault(mod, []).append(x.detach())
        return x

    with torch.no_grad(), hooked(fm.model, dict.fromkeys(mods, keep)):
        fm.f(fm.theta)
    out = {}
    for mod, xs in seen.items():
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs if x.shape[-1] == xs[0].shape[-1]])
        if torch.unique(rows, dim=0).shape[0] <= share * rows.shape[0]:
            out[mod] = xs
    return out


def _sources(fm: FlatModel, fed: dict[nn.Module, list[Tensor]]) -> list[nn.Module]:
    """The table-fed modules whose inputs depend on no other table-fed module's output:
    where the table enters, and the only places noise goes. Noise further down would break
    what the layers before guarantee (a norm's outputs orthogonal to `1`, a ReLU unit's
    rescaling between the layers around it) and with it true symmetries, which would then
    pass for the table's. Dependence is measured: each module's output is moved in turn and
    the others' inputs watched."""
    mods = list(fed)

    def inputs(moved: nn.Module | None) -> dict[nn.Module, list[Tensor]]:
        seen: dict[nn.Module, list[Tensor]] = {}

        def keep(mod: nn.Module, call: int, x: Tensor) -> Tensor:
            seen.setdefault(mod, []).append(x.detach().clone())
            return x

        def move(mod: nn.Module, args: tuple, out: object) -> object:
            return out + 1.0 if isinstance(out, Tensor) and out.is_floating_point() else out

        handle = moved.register_forward_hook(move) if moved is not None else None
        try:
            with torch.no_grad(), hooked(fm.model, dict.fromkeys(mods, keep)):
                fm.f(fm.theta)
        finally:
            if handle is not None:
                handle.remove()
        return seen

    base = inputs(None)
    derived: set[nn.Module] = set()
    for a in mods:
        after = inputs(a)
        for b in mods:
            if b is not a and any(
                x.shape != y.shape or not torch.equal(x, y)
                for x, y in zip(base.get(b, []), after.get(b, []))
            ):
                derived.add(b)
    return [m for m in mods if m not in derived]


def table_cause(fm: FlatModel, missing: Tensor, orbit: Tensor, floor: float) -> CauseSpace:
    """The `CauseSpace` of the table-fed layers of `fm` (see the module): the directions of
    `missing` (orthonormal `(n_params, k)`, `ker J` off the orbit) that leave the kernel,
    by more than `floor`, when those layers' inputs are made distinct, even with any orbit
    tangent (orthonormal `orbit` `(n_params, r)`) added. The orbit counts because the
    perturbation can break a true symmetry (a rotation of the rows the noise is added to):
    a missing direction that stays in the kernel once combined with such a tangent is a
    symmetry discovery does not know, not the table's."""
    fed = table_fed(fm)
    n = fm.theta.numel()
    k = missing.shape[1]
    if not fed or k == 0:
        return CauseSpace("of layers fed by a table", (), torch.zeros(n, 0, dtype=missing.dtype))
    g = torch.Generator().manual_seed(0)
    noise = {
        m: [NOISE * x.std() * torch.randn(x.shape, generator=g, dtype=x.dtype) for x in fed[m]]
        for m in _sources(fm, fed)
    }

    def spread(mod: nn.Module, call: int, x: Tensor) -> Tensor:
        return x + noise[mod][call] if call < len(noise[mod]) else x

    both = torch.cat([missing, orbit.to(missing.dtype)], dim=1)
    with hooked(fm.model, dict.fromkeys(noise, spread)):
        moved = jacobian_on(fm.f, fm.theta, both)
    _, s, vh = svd(moved, full_matrices=False)
    stay = vh[int((s > floor).sum()) :, :k]  # missing parts of combinations still in ker J
    kept = span(stay.T, 1e-8)  # (k, j): the missing directions that stay
    leave = torch.eye(k, dtype=missing.dtype) - kept @ kept.T
    dirs = missing @ span(leave, 0.5)  # the ones that leave whatever the orbit adds
    names = {id(p): k for k, p in fm.model.named_parameters()}
    where = tuple(names[id(p)] for m in fed for p in m.parameters(recurse=False))
    rows = min(
        int(torch.unique(xs[0].reshape(-1, xs[0].shape[-1]), dim=0).shape[0]) for xs in fed.values()
    )
    return CauseSpace(f"of layers fed by a table of {rows} distinct input rows", where, dirs)
