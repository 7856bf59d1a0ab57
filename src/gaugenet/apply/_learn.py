"""Learning the gauge element on the group's manifold against the rounded model's output
error (the way SpinQuant learns its residual-stream rotation).

The element is kept on the group by construction: each learned factor `f` is written
`g_f = g⁰_f · f.exp(ξ_f)` with `ξ_f` its Lie-algebra coordinates (for an orthogonal factor,
the entries above the diagonal of a skew-symmetric matrix, so `f.exp(ξ)` is a rotation for
every `ξ`; for a rescaling, log-scales). Adam moves the `ξ` (a trivialization of the
manifold: no retraction or projection is needed), and the group's own `act_state` carries
the element to the weights, so the model before rounding computes the same function at
every step.

The loss is the output distance (`Σ (y_q − y)²` by default) of the model whose quantized
weights (and, for weight-and-activation schemes, whose Linear/Conv inputs, per token) are
rounded as the scheme rounds them, against the float model on the calibration inputs.
Rounding has zero derivative almost everywhere; the straight-through estimator passes the
gradient of the rounded value to the unrounded one (`w + (round(w) − w).detach()`).

Every learned factor is merged into the weights. Rotations that must stay online (a
Hadamard before a down projection, SpinQuant's `R4`) are not symmetries of the weights
alone and are not learned; where the caller asks for them (`equalize(..., online=True)`,
`_online`), the loss rounds those layers as the rotation deploys them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..groups import Element, GaugeGroup
from ..groups._base import AbstractFactor, State
from ._distance import OutputDistance, squared_error
from ._quantize import transposed_params
from ._schemes import QuantScheme, round_weight, with_activation_rounding
from ._search import forward_fn

__all__ = ["learn_element", "straight_through"]


def straight_through(
    w: Tensor, scheme: QuantScheme, transposed: bool = False, rotated: bool = False
) -> Tensor:
    """`w` rounded as `scheme` rounds a weight (`transposed`: stored `(in, out)`; `rotated`:
    its input rotated online), with the gradient of the identity (the straight-through
    estimator): the value of `round_weight(w)`, the derivative of `w`."""
    return w + (round_weight(w.detach(), scheme, transposed, rotated) - w).detach()


def learn_element(
    group: GaugeGroup,
    model: nn.Module,
    inputs: Any,
    start: State,
    base: Element,
    factors: Sequence[AbstractFactor],
    names: Sequence[str],
    scheme: QuantScheme,
    *,
    steps: int,
    lr: float = 2e-3,
    distance: OutputDistance = squared_error,
    online: Collection[str] = (),
) -> tuple[Element, float]:
    """`steps` of Adam on the algebra coordinates of `factors`, from `base`, against the
    rounded model's output error on `inputs`.

    Each factor's step is `lr / sqrt(f.dim)` per coordinate (so a step moves about `lr` in
    norm whatever the factor's dimension), decayed to zero on a cosine; the best iterate
    seen (by the loss, which at each step is exactly the rounded model's output error) is
    returned, `base` itself when no step lowers it. Deterministic: no sampling.

    **Arguments:**

    - `group`, `model`: the gauge group and its model (float; its dtype is used to run).
    - `inputs`: the calibration inputs.
    - `start`: the model's state, float64; `base`: the element to start from (every factor
      of the group that it moves, learned or not).
    - `factors`: the continuous factors to learn (e.g. the orthogonal ones).
    - `names`: the weights the scheme rounds; `scheme`: how they (and inputs) are rounded.
    - `steps`, `lr`: Adam iterations and the norm of one step in the algebra.
    - `distance`: the loss `(y_q, y) ↦` scalar (`squared_error` by default).
    - `online`: Linear layers rounded as their online input rotation deploys them.

    **Returns:** `(element, loss)`: the best element (in the group: `base` composed with
    exponentials) and its loss in the model's dtype.
    """
    if steps < 0 or not lr > 0:
        raise GaugeError(f"learning needs steps >= 0 and lr > 0, got {steps} and {lr}")
    factors = [f for f in factors if not f.discrete and f.dim > 0]
    dtype = next(p.dtype for p in model.parameters())
    run_float = forward_fn(model, inputs)
    noisy = (
        with_activation_rounding(
            model, scheme.act_bits, copy_model=True, straight_through=True, online=online
        )
        if scheme.act_bits
        else model
    )
    run = forward_fn(noisy, inputs, prefer=names)
    transposed = transposed_params(model)
    rotated = {f"{n}.weight" for n in online}
    with torch.no_grad():
        y = run_float(_cast(start, dtype)).detach()
    xis = [torch.zeros(f.dim, dtype=torch.float64, requires_grad=True) for f in factors]
    groups = [{"params": [xi], "lr": lr / math.sqrt(f.dim)} for f, xi in zip(factors, xis)]

    def element() -> Element:
        out = dict(base)
        for f, xi in zip(factors, xis):
            out[f.name] = f.compose(base.get(f.name, f.identity(torch.float64)), f.exp(xi))
        return out

    def loss() -> Tensor:
        st = _cast(group.act_state(start, element(), validate=False), dtype)
        st.update(
            {n: straight_through(st[n], scheme, n in transposed, n in rotated) for n in names}
        )
        return distance(run(st), y)

    best_elem, best = dict(base), math.inf
    if not factors or steps == 0:
        return best_elem, best
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    for k in range(steps + 1):
        opt.zero_grad()
        value = loss()
        if float(value.detach()) < best:  # the value at the current iterate, before its step
            best = float(value.detach())
            best_elem = {n: v.detach().clone() for n, v in element().items()}
        if k < steps:
            value.backward()
            opt.step()
            sched.step()
    return best_elem, best


def _cast(state: State, dtype: torch.dtype) -> State:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
