"""Symmetry teleportation: move along the gauge orbit to a point where SGD makes more progress.

The loss is constant on the orbit, so a teleport costs nothing in loss but can put the next
gradient steps where they make more progress. The orbit point is `act(θ, exp(ξ))`, found by
ascent over the algebra coordinates `ξ` on one of three objectives:

- `"grad"` (Zhao et al.): `log ‖∇L‖²`, optionally with the gain capped (`max_gain`);
- `"lookahead"`: `−log L` after `unroll` plain SGD steps of size `sgd_lr` from the orbit point
  (differentiated through the steps), i.e. the decrease SGD of that step size actually makes;
- `"norm"`: `−log ‖θ‖²`, the minimum-norm (balanced) point of the orbit (equi-normalization).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._errors import GaugeError
from ..groups import GaugeGroup, load_state, model_state

__all__ = ["Teleporting", "teleport"]

LossFn = Callable[[Tensor, Tensor], Tensor]
OBJECTIVES = ("grad", "lookahead", "norm")


def _grad_sq(
    model: nn.Module,
    group: GaugeGroup,
    state: Mapping[str, Tensor],
    names: list[str],
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    xi: Tensor,
) -> tuple[Tensor, Tensor]:
    new = group.act_state(state, group.exp(xi), validate=False)
    params = [new[n] for n in names]
    x, y = batch
    value = loss_fn(functional_call(model, new, (x,)), y)
    grads = torch.autograd.grad(value, params, create_graph=True)
    return value, sum((g**2).sum() for g in grads)


def _lookahead(
    model: nn.Module,
    group: GaugeGroup,
    state: Mapping[str, Tensor],
    names: list[str],
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    xi: Tensor,
    sgd_lr: float,
    unroll: int,
) -> Tensor:
    new = dict(group.act_state(state, group.exp(xi), validate=False))
    x, y = batch
    for _ in range(unroll):
        value = loss_fn(functional_call(model, new, (x,)), y)
        grads = torch.autograd.grad(value, [new[n] for n in names], create_graph=True)
        new.update({n: new[n] - sgd_lr * g for n, g in zip(names, grads)})
    return loss_fn(functional_call(model, new, (x,)), y)


def _objective(
    objective: str,
    model: nn.Module,
    group: GaugeGroup,
    state: Mapping[str, Tensor],
    names: list[str],
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    xi: Tensor,
    sgd_lr: float,
    unroll: int,
) -> Tensor:
    """The quantity to maximise (a log, so that ascent steps are scale free)."""
    if objective == "grad":
        return torch.log(_grad_sq(model, group, state, names, loss_fn, batch, xi)[1])
    if objective == "lookahead":
        return -torch.log(
            _lookahead(model, group, state, names, loss_fn, batch, xi, sgd_lr, unroll)
        )
    new = group.act_state(state, group.exp(xi), validate=False)
    return -torch.log(sum((new[n] ** 2).sum() for n in names))


def teleport(
    model: nn.Module,
    group: GaugeGroup,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    *,
    steps: int = 10,
    lr: float = 0.1,
    max_step: float = 0.5,
    objective: str = "grad",
    max_gain: float | None = None,
    sgd_lr: float | None = None,
    unroll: int = 1,
) -> nn.Module:
    """Teleport `model` along its gauge orbit to a point where SGD makes more progress.

    **Arguments:**

    - `model`, `group`: the network and its gauge group (continuous factors are used).
    - `loss_fn`: `loss_fn(model(x), y)`, a scalar; `batch = (x, y)`.
    - `steps`, `lr`: gradient-ascent steps on the objective over the algebra coordinates `ξ`.
      The objective is a logarithm (so `lr` is scale free); each step is clipped to length
      `max_step` in `ξ`.
    - `objective`: `"grad"` (default; maximise `‖∇L‖²`, Zhao et al.), `"lookahead"`
      (minimise the loss after `unroll` SGD steps of size `sgd_lr`, differentiated through
      the steps) or `"norm"` (minimise `‖θ‖²`, the balanced point of the orbit).
    - `max_gain`: `"grad"` only: stop once `‖∇L‖²` has grown by this factor (a bounded
      teleport; an unbounded one can raise it by orders of magnitude and make a fixed SGD
      step size overshoot). `None`: no cap.
    - `sgd_lr`, `unroll`: `"lookahead"` only: the SGD step size (required) and step count.

    **Returns:** a new model `act(model, exp(ξ))` (the input model is not modified); its loss
    equals the old one up to rounding. Steps that would lower the objective are rejected
    (the step length is halved instead), so the objective never decreases.
    """
    if steps < 0 or not lr > 0:
        raise GaugeError(f"teleport: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if objective not in OBJECTIVES:
        raise GaugeError(f"teleport: objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "lookahead" and (sgd_lr is None or not sgd_lr > 0 or unroll < 1):
        raise GaugeError(
            f"teleport: 'lookahead' needs sgd_lr > 0 and unroll >= 1, got {sgd_lr}, {unroll}"
        )
    if max_gain is not None and not max_gain > 1:
        raise GaugeError(f"teleport: max_gain must be > 1, got {max_gain}")
    state = model_state(model)
    names = [n for n, _ in model.named_parameters()]
    dtype = state[names[0]].dtype
    xi = torch.zeros(group.dim, dtype=dtype)
    state = {
        k: (v.requires_grad_(True) if k in names else v)
        for k, v in ((k, v.clone()) for k, v in state.items())
    }
    args = (model, group, state, names, loss_fn, batch)
    extra = (float(sgd_lr or 0.0), unroll)
    best = start = None
    for _ in range(steps):
        xi_req = xi.clone().requires_grad_(True)
        obj = _objective(objective, *args, xi_req, *extra)
        if best is None:
            best = start = float(obj.detach())
        (dxi,) = torch.autograd.grad(obj, xi_req)
        step = lr * dxi
        n = float(step.norm())
        if n > max_step:
            step = step * (max_step / n)
        # accept only improving steps: the orbit is curved and the ascent can overshoot
        for _ in range(5):
            cand = (xi + step).detach()
            val = float(_objective(objective, *args, cand, *extra).detach())
            if val > best:
                xi, best = cand, val
                break
            step = step / 2
        if max_gain is not None and objective == "grad" and best - start >= math.log(max_gain):
            break
    with torch.no_grad():
        return group.act(model, group.exp(xi))


class Teleporting:
    """Wrap an optimizer so that every `every`-th step starts with a teleport.

    **Arguments:**

    - `optimizer`: a `torch.optim` optimizer over `model.parameters()`.
    - `every`: teleport before steps `0, every, 2 every, ...`.
    - `model`, `group`, `loss_fn`: as in `teleport`; `steps`, `lr`: its ascent settings;
      further keywords (`objective`, `max_gain`, `sgd_lr`, `unroll`, `max_step`) are passed
      to `teleport`.

    `opt.step(batch)` teleports when due (using `batch = (x, y)`, writing the new parameters
    into `model` in place and clearing the optimizer's state, whose momenta belong to the
    old point), then calls `optimizer.step()`; the gradients must already be in `.grad`
    (they are recomputed after a teleport). `opt.zero_grad()` forwards.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        every: int,
        *,
        model: nn.Module,
        group: GaugeGroup,
        loss_fn: LossFn,
        steps: int = 10,
        lr: float = 0.1,
        **options: object,
    ) -> None:
        if every < 1:
            raise GaugeError(f"Teleporting: every must be a positive integer, got {every}")
        self.optimizer, self.every = optimizer, every
        self.model, self.group, self.loss_fn = model, group, loss_fn
        self.steps, self.lr, self.options = steps, lr, options
        self.count = 0
        self.teleports = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, batch: tuple[Tensor, Tensor]) -> None:
        if self.count % self.every == 0:
            moved = teleport(
                self.model,
                self.group,
                self.loss_fn,
                batch,
                steps=self.steps,
                lr=self.lr,
                **self.options,  # type: ignore[arg-type]
            )
            load_state(self.model, {n: p.detach() for n, p in moved.named_parameters()})
            self.optimizer.state.clear()
            self.teleports += 1
            self.optimizer.zero_grad()
            x, y = batch
            self.loss_fn(self.model(x), y).backward()
        self.optimizer.step()
        self.count += 1
