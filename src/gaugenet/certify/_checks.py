"""Checking each factor of a group on a model: its action keeps the outputs, and its orbit
tangents lie in the kernel of the Jacobian (measured, not counted)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._invariance import cast_floats
from .._tolerances import param_dtype
from ..groups import GaugeGroup, model_state
from ..groups._base import AbstractFactor
from ._autograd import AutogradProducts, or_autograd
from ._jacobian import FlatModel, as_tuple, flatten_out, measuring

__all__ = [
    "FactorChecks",
    "act_tolerance",
    "check_act",
    "check_tangents",
    "flat_tangent",
    "outputs_of",
    "relative_change",
    "sparse_jvp",
    "tangent_probes",
]

Apply = Callable[[Tensor], Tensor]


@dataclass
class FactorChecks:
    """What the checks found: `wrong` factor names with `reasons`, the tangent residuals,
    the act error, and `notes` for the report (an act error of a narrow dtype that float64
    shows to be round-off)."""

    residuals: dict[str, float] = field(default_factory=dict)
    act_error: float = 0.0
    act_tol: float = 0.0
    wrong: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _flag(out: FactorChecks, name: str, why: str) -> None:
    """Record that factor `name` is wrong, adding `why` to its reasons."""
    out.wrong[name] = f"{out.wrong[name]}; {why}" if name in out.wrong else why


def act_tolerance(dtype: torch.dtype) -> float:
    """`√ε` of `dtype`: `1.5e-8` (float64), `3.5e-4` (float32), `0.03` (float16), `0.09`
    (bfloat16). A group element acts by a few products per weight, so a symmetry moves the
    outputs by a few `ε` times the conditioning; `√ε` leaves room for the latter while
    still catching any real change."""
    return math.sqrt(torch.finfo(dtype).eps)


def outputs_of(model: nn.Module, inputs: Any) -> Tensor:
    """`model`'s outputs on `inputs`, flattened into one vector (no gradients; attention
    run as its composite form, as the Jacobians are)."""
    with torch.no_grad(), measuring():
        return flatten_out(model(*as_tuple(inputs)))


def relative_change(ref: Tensor, new: Tensor) -> float:
    """`max|new − ref| / max|ref|`; `inf` for another shape or a non-finite change."""
    if ref.shape != new.shape:
        return math.inf
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((new - ref).abs().max()) if ref.numel() else 0.0
    return diff / max(scale, 1e-300) if math.isfinite(diff) else math.inf


def _one_factor(group: GaugeGroup, f: AbstractFactor) -> GaugeGroup:
    return GaugeGroup((f,), (), group.param_names)


def _float64(model: nn.Module, inputs: Any) -> tuple[nn.Module, Any] | None:
    """A float64 copy of `model` and its floating `inputs`, or `None` when the model cannot
    be copied or converted (then the narrow dtype's check stands alone)."""
    try:
        wide = copy.deepcopy(model).to(torch.float64)
    except Exception:  # a model that does not deep-copy: no second opinion
        return None
    return wide, cast_floats(inputs, torch.float64)


def check_act(
    model: nn.Module,
    inputs: Any,
    group: GaugeGroup,
    out: FactorChecks,
    gen: torch.Generator,
) -> None:
    """Act on `model` (in its own dtype) with one random element of the whole group and
    compare the outputs on `inputs`. When that fails in a dtype narrower than float64, the
    same element acts on a float64 copy: within float64's tolerance there, the failure is
    the narrow dtype's round-off on this element (long inputs and far elements amplify
    it), said in `notes`, not a broken symmetry. Otherwise each factor alone is tried (in
    float64 when a copy was made), to name the culprits (a factor that raises is wrong,
    with the error)."""
    dtype = param_dtype(model) or torch.float64
    out.act_tol = act_tolerance(dtype)
    ref = outputs_of(model, inputs)
    g = group.sample(gen)
    try:
        out.act_error = relative_change(ref, outputs_of(group.act(model, g), inputs))
    except Exception:  # named below, factor by factor
        out.act_error = math.inf
    if out.act_error <= out.act_tol:
        return
    tol = out.act_tol
    wide = _float64(model, inputs) if dtype != torch.float64 else None
    if wide is not None and math.isfinite(out.act_error):
        model, inputs = wide
        ref = outputs_of(model, inputs)
        tol = act_tolerance(torch.float64)
        try:
            err = relative_change(ref, outputs_of(group.act(model, g), inputs))
        except Exception:
            err = math.inf
        if err <= tol:
            out.notes.append(
                f"act check: the random element changes the {str(dtype).removeprefix('torch.')} "
                f"outputs by {out.act_error:.1e} (over its tolerance {out.act_tol:.0e}) and "
                f"the outputs of a float64 copy by {err:.1e} (tolerance {tol:.0e}): round-off "
                "of the narrow dtype on this element and these inputs, not a broken symmetry"
            )
            return
    found = False
    for f in group.factors:
        try:
            err = relative_change(
                ref, outputs_of(_one_factor(group, f).act(model, {f.name: g[f.name]}), inputs)
            )
        except Exception as exc:
            _flag(out, f.name, f"acting with it raises {type(exc).__name__}: {exc}")
            found = True
            continue
        if err > tol:
            _flag(out, f.name, f"a random element changes the outputs by {err:.2e} (relative)")
            found = True
    if not found:
        _flag(
            out,
            "(group)",
            (
                f"every factor alone keeps the outputs, all together change them by "
                f"{out.act_error:.2e}: the factors do not compose"
            ),
        )


def tangent_probes(
    fm: FlatModel, group: GaugeGroup, f: AbstractFactor, k: int, gen: torch.Generator
) -> list[dict[str, Tensor]]:
    """`k` vectors `Tᵀ z` for random Gaussian `z` (all tangents when `dim ≤ k`), `T` the
    factor's orbit tangents at `fm.theta`, each a forward-mode derivative of its action,
    as `{parameter name: tangent}` over the parameters the factor writes (the rest are
    zero); never the dense `(dim, n_params)` tangents."""
    state = model_state(fm.model)
    one = _one_factor(group, f)
    zero = torch.zeros(f.dim, dtype=torch.float64)
    trial = one.act_state(state, {f.name: f.exp(zero)}, validate=False)
    written = [n for n in fm.names if trial[n] is not state[n]]

    def part(xi: Tensor) -> tuple[Tensor, ...]:
        new = one.act_state(state, {f.name: f.exp(xi)}, validate=False)
        return tuple(new[n] for n in written)

    z = (
        torch.eye(f.dim, dtype=torch.float64)
        if f.dim <= k
        else torch.randn(k, f.dim, generator=gen, dtype=torch.float64)
    )
    return [dict(zip(written, torch.func.jvp(part, (zero,), (zi,))[1])) for zi in z]


def flat_tangent(fm: FlatModel, t: dict[str, Tensor]) -> Tensor:
    """A `tangent_probes` entry as a flat `(n_params,)` vector."""
    out = torch.zeros_like(fm.theta)
    starts = fm.offsets()
    for name, v in t.items():
        out[starts[name] : starts[name] + v.numel()] = v.reshape(-1)
    return out


def sparse_jvp(fm: FlatModel) -> Callable[[dict[str, Tensor]], Tensor]:
    """`t ↦ J t` for a tangent given on a few parameters (`{name: tangent}`): forward mode
    through those parameters only, so its cost does not grow with the others (plain
    autograd on every parameter where `torch.func` cannot transform the model)."""
    base = fm.params(fm.theta)
    buffers = dict(fm.model.named_buffers())

    def apply(t: dict[str, Tensor]) -> Tensor:
        names = list(t)

        def f(*ps: Tensor) -> Tensor:
            params = {**base, **dict(zip(names, ps)), **buffers}
            with measuring():
                return flatten_out(torch.func.functional_call(fm.model, params, fm.args))

        primals = tuple(base[n] for n in names)
        return torch.func.jvp(f, primals, tuple(t[n] for n in names))[1]

    def by_autograd() -> Callable[[dict[str, Tensor]], Tensor]:
        jvp = AutogradProducts(fm).jvp
        return lambda t: jvp(flat_tangent(fm, t))

    return or_autograd(apply, by_autograd)


def check_tangents(
    fm: FlatModel,
    group: GaugeGroup,
    apply_j: Callable[[dict[str, Tensor]], Tensor],
    sigma_max: float,
    rtol: float,
    out: FactorChecks,
    gen: torch.Generator,
    *,
    k: int = 2,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Per continuous factor, `‖J V‖_F / (σ_max ‖V‖_F)` for `V` from `tangent_probes`
    (`apply_j(t)` is `J t`); above `rtol` (or a tangent that is zero, or raises) the factor
    is wrong."""
    cont = [f for f in group.factors if not f.discrete and f.dim > 0]
    for i, f in enumerate(cont):
        if progress is not None:
            progress(f"tangent check {i + 1}/{len(cont)}: {f.name}")
        try:
            probes = tangent_probes(fm, group, f, k, gen)
        except Exception as exc:
            _flag(out, f.name, f"its tangents raise {type(exc).__name__}: {exc}")
            out.residuals[f.name] = math.inf
            continue
        vn = math.sqrt(sum(float(v.norm()) ** 2 for t in probes for v in t.values()))
        if not vn > 0:
            _flag(out, f.name, "its tangents are zero: it does not move the parameters")
            out.residuals[f.name] = math.inf
            continue
        jn = math.sqrt(sum(float(apply_j(t).norm()) ** 2 for t in probes))
        res = jn / (max(sigma_max, 1e-300) * vn)
        out.residuals[f.name] = res
        if not res <= rtol:
            _flag(
                out,
                f.name,
                f"its orbit tangents leave ker J: ‖J Tᵀ‖ / (‖J‖ ‖T‖) = {res:.2e} > {rtol:.0e}",
            )
