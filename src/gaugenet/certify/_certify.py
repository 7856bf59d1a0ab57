"""`certify(model, inputs)`: are the discovered symmetries right, and do they explain every
redundancy?"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from .._float64_kernels import float64_kernels
from .._tolerances import param_dtype
from ..discovery._float64 import keep_float64
from ..groups import GaugeGroup
from ._causes import layernorm_causes, lookup_causes, relu_causes, tied_causes
from ._checks import (
    FactorChecks,
    check_act,
    check_tangents,
    flat_tangent,
    outputs_of,
    relative_change,
    sparse_jvp,
)
from ._davidson import lanczos_max, power_max
from ._functional_dimension import check_outputs, rank_of
from ._gap import locate_gap
from ._jacobian import as_tuple, first_samples, flat_model, float64_throughout, jacobian_of
from ._keywords import positional
from ._matrix_free import gauss_newton, linear_jvp, matrix_free_certificate
from ._memory import Sizes, activation_bytes, estimates
from ._orbit import Orbit, orbit_projector
from ._result import CertifyReport, Verdict
from ._slice_certify import certify_slice

__all__ = ["DEFAULT_MEMORY_BUDGET", "certify"]

Method = Literal["auto", "exact", "matrix-free", "checks"]
#: bytes `certify` may use by default (3 GB)
DEFAULT_MEMORY_BUDGET = 3 * 10**9
#: `"auto"` forms the Jacobian up to this many parameters (time, not memory)
_EXACT_MAX = 20_000
#: above this many parameters the matrix-free tangent check takes one probe per factor on
#: the first `_CHECK_SAMPLES` inputs (each product costs a forward pass on the inputs)
_LARGE = 100_000
_CHECK_SAMPLES = 2


def _batch_of(inputs: Any) -> int | None:
    """The common leading size of the tensor inputs, `None` when there is none."""
    sizes = {a.shape[0] for a in as_tuple(inputs) if isinstance(a, Tensor) and a.ndim}
    return sizes.pop() if len(sizes) == 1 else None


def _largest_eigenvalue(op: Callable[[Tensor], Tensor], start: Tensor, *, large: bool) -> float:
    """A lower bound of the largest eigenvalue of the PSD `op`, close: 6 Lanczos steps, or
    for a large model 4 power steps (a Rayleigh quotient; two vectors kept, not six). A
    lower bound only makes the tangent residuals relative to it larger (conservative)."""
    return lanczos_max(op, start, 6) if not large else power_max(op, start, 4)


def _unanalyzed_causes(model: nn.Module) -> list[str]:
    from ..discovery._unanalyzed import unanalyzed_breakers

    return [str(b) for b in unanalyzed_breakers(model)]


def _choose(
    method: Method, est: dict[str, int], budget: int, sizes: Sizes, notes: list[str]
) -> str:
    """The method to run: the requested one when it fits `budget`, else a `GaugeError`;
    for `"auto"` exact up to 20 000 parameters, else matrix-free, else the checks alone
    (with the reason in `notes`)."""
    gb = f"{budget / 1e9:.2f} GB"
    if est["checks"] > budget:
        raise GaugeError(
            f"memory budget {gb} is too small even for the per-factor checks (about "
            f"{est['checks'] / 1e9:.2f} GB for {sizes.n_params} parameters in float64): "
            "raise memory_budget"
        )
    if method in ("exact", "matrix-free"):
        if est[method] > budget:
            raise GaugeError(
                f"the {method} method needs about {est[method] / 1e9:.2f} GB, over the "
                f"memory budget {gb}: raise memory_budget, pass fewer inputs, or use "
                + ("method='matrix-free'" if method == "exact" else "method='checks'")
            )
        return method
    if method == "checks":
        return method
    need = sizes.n_params - sizes.dim
    if sizes.n_outputs < need:
        notes.append(
            f"completeness not tested: the {sizes.n_outputs} outputs on these inputs cannot "
            f"reach the rank {need} = n_params − dim, so ker J is large whatever the "
            "symmetries; pass more inputs"
        )
        return "checks"
    small = sizes.n_params <= _EXACT_MAX and sizes.n_outputs > sizes.n_params
    if small and est["exact"] <= budget:
        return "exact"
    if est["matrix-free"] <= budget:
        return "matrix-free"
    notes.append(
        f"completeness not tested: the matrix-free method needs about "
        f"{est['matrix-free'] / 1e9:.2f} GB, over the memory budget {gb}"
    )
    return "checks"


def certify(
    model: nn.Module,
    inputs: Any,
    *,
    group: GaugeGroup | None = None,
    method: Method = "auto",
    rtol: float = 1e-9,
    max_iter: int = 2000,
    tol: float = 1e-2,
    memory_budget: int | float = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[str], None] | None = None,
    generator: torch.Generator | None = None,
    params: Mapping[str, Tensor] | None = None,
) -> CertifyReport:
    """Check every factor of `group` on `model`, then compare the functional dimension of
    `model` on `inputs` with the group's dimension.

    **What is checked.**

    1. *Right*: a random element of the group (permutations included), acting on `model`
       in its own dtype, keeps the outputs on `inputs` to `√ε` of that dtype (relative);
       and per continuous factor, `‖J Tᵀ‖_F / (‖J‖₂ ‖T‖_F) ≤ rtol` for random
       combinations `T` of its orbit tangents (float64, forward mode). A factor that fails
       or raises makes the verdict `wrong` and is named.
    2. *Complete*: `"exact"` forms the Jacobian and counts its rank: `dim = n_params −
       rank J` is `complete`, a positive difference `incomplete` (exact count).
       `"matrix-free"` (see `matrix_free_certificate`) gives a certified lower bound on the
       missing dimension: `1` when `J` is numerically singular off the orbit
       (`incomplete`), else `0`, which is no proof (`right`). `"checks"` skips this step.

    **Arguments:**

    - `model`, `inputs`: the model and a batch. For a completeness test the outputs must
      number at least `n_params − dim`.
    - `group`: the symmetries; default `gaugenet.symmetries(model, inputs)`.
    - `method`: `"auto"` (exact up to 20 000 parameters when it fits the budget, else
      matrix-free when it fits, else the checks alone, saying why in `notes`), `"exact"`,
      `"matrix-free"`, `"checks"`.
    - `rtol`: relative threshold of a zero singular value and of a tangent residual
      (matrix-free: `max(rtol, 10⁻⁶)` for `sigma_min / sigma_max`, as it works with `JᵀJ`).
    - `max_iter`, `tol`: products allowed and convergence fraction (matrix-free).
    - `memory_budget`: bytes the methods may use, estimated for each before it starts; a
      requested method over budget raises `GaugeError` naming the budget.
    - `progress`: called with a description of each stage.
    - `generator`: for the random elements and probes (default: seeded, reproducible).
    - `params`: certify a slice of the parameters instead of the whole model: `{name: mask
      or flat indices}` (a boolean tensor of the parameter's shape, or an integer tensor),
      the other entries frozen. Measured is `|S| − rank J_S` (`J_S` the Jacobian's columns
      of the slice's entries, formed exactly, so the outputs must outnumber `|S|`; singular
      values under `rtol ‖J‖₂` count as zero, `‖J‖₂` of the whole model from power steps);
      discovered the dimension of the orbit tangents that move only the slice's entries,
      `dim(span T ∩ ℝ^S)`. Equal: `complete` on the slice; more measured: `incomplete`, the
      missing directions a lower bound of what the group misses on the whole model. The
      act check is the whole group's, the tangent check that of the factors touching the
      slice; `method` must be `"auto"` or `"exact"`. The
      report's `slice` says what was measured (see `CertifyReport`). Unknown names, masks
      of the wrong shape, indices out of range or an empty slice raise `GaugeError`.

    **Returns:** a `CertifyReport` (verdict, dimensions, residuals, timings).
    """
    if not rtol > 0:
        raise GaugeError(f"rtol must be positive, got {rtol}")
    if not memory_budget > 0:
        raise GaugeError(f"memory_budget must be positive (bytes), got {memory_budget}")
    if method not in ("auto", "exact", "matrix-free", "checks"):
        raise GaugeError(
            f"method must be 'auto', 'exact', 'matrix-free' or 'checks', not {method!r}"
        )
    budget = int(memory_budget)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        if progress is not None:
            progress(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    if group is None:
        from ..discovery import symmetries

        with stage("discovering symmetries"):
            group = symmetries(model, inputs)
    # keyword inputs (a dict, as `symmetries` takes): the model as a function of them in order
    model, inputs = positional(model, inputs)
    if params is not None and method not in ("auto", "exact"):
        raise GaugeError(f"a slice (params=...) is certified exactly, not with {method!r}")
    dtype = param_dtype(model)
    agree = _float64_throughout(model, inputs)
    if agree is None:
        wide = nullcontext()
    elif dtype == torch.float64:
        wide = keep_float64()  # the model itself, and every measurement
    else:
        wide = float64_throughout()  # its float64 copy only: the act check keeps its dtype
    with wide, float64_kernels():  # its own calls of the model too (float64 grouped_mm)
        if params is not None:
            report = certify_slice(
                model,
                inputs,
                group,
                params,
                rtol=rtol,
                budget=budget,
                gen=gen,
                stage=stage,
                timings=timings,
                progress=progress,
            )
        else:
            report = _certify_whole(
                model,
                inputs,
                group,
                method,
                rtol,
                max_iter,
                tol,
                budget,
                gen,
                stage,
                timings,
                progress,
            )
    if agree is None:
        return report
    which = "float64 model" if dtype == torch.float64 else f"float64 copy of this {dtype} model"
    note = (
        f"{which}: its casts to a lower precision (a float32 softmax or norm "
        f"variance, ...) are kept in float64 for every measurement (outputs moved by {agree:.0e})"
    )
    return dataclasses.replace(report, notes=(*report.notes, note))


def _float64_throughout(model: nn.Module, inputs: Any) -> float | None:
    """For a model whose float64 copy (the model itself when float64) moves its outputs when
    its casts down are kept in float64 (`keep_float64`), by less than float32's `√ε`
    (relative), that change: the float64 copy then computes the same function, without
    float32 rounding hiding exact identities. `None` otherwise (no cast down, or a model
    that fails or computes something else so), and the measurements run as the model is."""
    dtype = param_dtype(model)
    if dtype is None:
        return None
    if dtype != torch.float64:
        model, inputs = _float64_copy(model, inputs)
    try:
        plain = outputs_of(model, inputs)
        with keep_float64():
            wide = outputs_of(model, inputs)
    except Exception:  # the model does not run with its casts kept: as it is
        return None
    if plain.dtype != wide.dtype:
        return None
    rel = relative_change(plain, wide)
    if rel == 0.0 or not rel < 1e-4:
        return None
    return rel


def _float64_copy(model: nn.Module, inputs: Any) -> tuple[nn.Module, Any]:
    """A float64 copy of `model`, and `inputs` with floating tensors in float64 (a tuple)."""
    fm = flat_model(model, inputs)
    return fm.model, fm.args


def _certify_whole(
    model: nn.Module,
    inputs: Any,
    group: GaugeGroup,
    method: Method,
    rtol: float,
    max_iter: int,
    tol: float,
    budget: int,
    gen: torch.Generator,
    stage: Callable[[str], AbstractContextManager[None]],
    timings: dict[str, float],
    progress: Callable[[str], None] | None,
) -> CertifyReport:
    """`certify` of the whole model (its arguments, `stage` timing each step)."""
    with stage("estimating memory"):
        fm = flat_model(model, inputs)
        with torch.no_grad():
            n_out = fm.f(fm.theta).numel()
        cont = [f.dim for f in group.factors if not f.discrete]
        n = fm.theta.numel()
        batch = _batch_of(inputs)
        share = min(1.0, _CHECK_SAMPLES / batch) if n > _LARGE and batch else 1.0
        sizes = Sizes(n, n_out, group.dim, max(cont, default=0), activation_bytes(fm), share)
        est = estimates(sizes)
    notes: list[str] = []
    chosen = _choose(method, est, budget, sizes, notes)
    n = sizes.n_params
    checks = FactorChecks()
    with stage("act check"):
        check_act(model, inputs, group, checks, gen)
    notes += checks.notes

    rank = smin = smax = None
    gap, converged, exact, unexplained = math.nan, True, False, None
    located: list[str] = []
    if chosen == "exact":
        check_outputs(fm, inputs)
        with stage("Jacobian"):
            jac = jacobian_of(fm)
        with stage("singular values"):
            fd = rank_of(jac, rtol=rtol)
        rank, gap, exact = fd.rank, fd.gap, True
        smax = float(fd.singular_values[0]) if fd.singular_values.numel() else 0.0
        with stage("tangent check"):
            check_tangents(
                fm,
                group,
                lambda t: jac @ flat_tangent(fm, t),
                smax,
                rtol,
                checks,
                gen,
                k=4,
                progress=progress,
            )
        if n - rank > group.dim:
            with stage("locating the gap"):
                orbit = orbit_projector(model, group)
                located = locate_gap(
                    jac, orbit, rank, fm.names, fm.sizes, flat=fm, rtol=rtol
                ).lines()
        del jac
    else:
        with stage("tangent check"):
            fc = fm
            if n > _LARGE:
                head = first_samples(inputs, _CHECK_SAMPLES)
                if head is not None:
                    del fm, fc  # the matrix-free certificate makes its own copy
                    fc = flat_model(model, head)
                    notes.append(
                        f"tangent residuals measured on the first {_CHECK_SAMPLES} inputs "
                        f"(a large model: {n} parameters)"
                    )
            jvp = linear_jvp(fc, trace=False)
            op = gauss_newton(fc, Orbit(torch.zeros(0, n, dtype=torch.float64)), jvp)
            start = torch.randn(n, generator=gen, dtype=torch.float64)
            smax = math.sqrt(max(_largest_eigenvalue(op, start, large=n > _LARGE), 0.0))
            del op
            del jvp
            check_tangents(
                fc,
                group,
                sparse_jvp(fc),
                smax,
                rtol,
                checks,
                gen,
                k=2 if n <= _LARGE else 1,
                progress=progress,
            )
            del fc
        if chosen == "matrix-free" and not checks.wrong:
            floor = max(rtol, 1e-6)
            with stage("matrix-free certificate"):
                mf = matrix_free_certificate(
                    model,
                    inputs,
                    group,
                    max_iter=max_iter,
                    tol=tol,
                    zero_tol=floor,
                    generator=gen,
                )
            smin, smax, gap = mf.sigma_min, mf.sigma_max, mf.sigma_min / mf.sigma_max
            rank = n - mf.orbit_rank - (0 if gap > floor else 1)
            converged = mf.converged
            if not mf.converged:
                notes.append(
                    f"the eigensolver did not converge in {max_iter} products: sigma_min "
                    f"{smin:.2e} is only an upper bound"
                )
    if rank is not None:
        unexplained = n - rank - group.dim
    wrong = dict(checks.wrong)
    if unexplained is not None and unexplained < 0 and not wrong:
        wrong["(group)"] = (
            f"the symmetry dimension {group.dim} exceeds n_params − rank J = {n - rank}: "
            "some factors' tangents are dependent, or the count is wrong"
        )
    if wrong:
        verdict = Verdict.WRONG
    elif unexplained is None or (unexplained == 0 and not exact):
        verdict = Verdict.RIGHT
    elif unexplained == 0:
        verdict = Verdict.COMPLETE
    else:
        verdict = Verdict.INCOMPLETE
    causes = _unanalyzed_causes(model)
    if unexplained is not None and unexplained > 0:
        with stage("looking for causes"):
            found = relu_causes(model, inputs) + tied_causes(model)
            if not exact:  # with the Jacobian at hand these two are measured in `located`
                found += lookup_causes(model, inputs) + layernorm_causes(model, inputs, rtol)
            causes = located + found + causes
    return CertifyReport(
        verdict=verdict,
        n_params=n,
        symmetry_dim=group.dim,
        functional_dimension=rank,
        unexplained=unexplained,
        exact=exact,
        method=chosen,
        tangent_residuals=checks.residuals,
        act_error=checks.act_error,
        act_tol=checks.act_tol,
        rtol=rtol,
        wrong=tuple(wrong),
        reasons=tuple(wrong.values()),
        gap=gap,
        sigma_min=smin,
        sigma_max=smax,
        converged=converged,
        causes=tuple(causes),
        notes=tuple(notes),
        memory_estimate=est[chosen],
        memory_budget=budget,
        timings=timings,
    )
