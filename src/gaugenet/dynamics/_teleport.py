"""Symmetry teleportation: move along the gauge orbit to where the gradient is steepest.

The loss is constant on the orbit, so a teleport costs nothing in loss but can put the next
gradient steps where they make more progress. The orbit point is `act(θ, exp(ξ))`, found by
gradient ascent on `‖∇L(act(θ, exp(ξ)))‖²` with respect to the algebra coordinates `ξ`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._errors import GaugeError
from ..groups import GaugeGroup, load_state, model_state

__all__ = ["Teleporting", "teleport"]

LossFn = Callable[[Tensor, Tensor], Tensor]


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


def teleport(
    model: nn.Module,
    group: GaugeGroup,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    *,
    steps: int = 10,
    lr: float = 0.1,
    max_step: float = 0.5,
) -> nn.Module:
    """Teleport `model` along its gauge orbit to a point of larger gradient norm.

    **Arguments:**

    - `model`, `group`: the network and its gauge group (continuous factors are used).
    - `loss_fn`: `loss_fn(model(x), y)`, a scalar; `batch = (x, y)`.
    - `steps`, `lr`: gradient-ascent steps on `‖∇L‖²` over the algebra coordinates `ξ`.
      Each step is rescaled by `1/‖∇L‖²` (ascent on `log ‖∇L‖²`, so `lr` is scale free),
      and clipped to length `max_step` in `ξ`.

    **Returns:** a new model `act(model, exp(ξ))` (the input model is not modified); its loss
    equals the old one up to rounding. Steps that would lower the gradient norm are
    rejected (the step length is halved instead).
    """
    if steps < 0 or not lr > 0:
        raise GaugeError(f"teleport: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    state = model_state(model)
    names = [n for n, _ in model.named_parameters()]
    dtype = state[names[0]].dtype
    xi = torch.zeros(group.dim, dtype=dtype)
    state = {
        k: (v.requires_grad_(True) if k in names else v)
        for k, v in ((k, v.clone()) for k, v in state.items())
    }
    best = None
    for _ in range(steps):
        xi_req = xi.clone().requires_grad_(True)
        _, sq = _grad_sq(model, group, state, names, loss_fn, batch, xi_req)
        if best is None:
            best = float(sq.detach())
        (dxi,) = torch.autograd.grad(sq, xi_req)
        step = lr * dxi / sq.detach()
        n = float(step.norm())
        if n > max_step:
            step = step * (max_step / n)
        # accept only improving steps: the orbit is curved and the ascent can overshoot
        for _ in range(5):
            cand = (xi + step).detach()
            _, sq_new = _grad_sq(
                model, group, state, names, loss_fn, batch, cand.clone().requires_grad_(False)
            )
            if float(sq_new.detach()) > best:
                xi, best = cand, float(sq_new)
                break
            step = step / 2
    with torch.no_grad():
        return group.act(model, group.exp(xi))


class Teleporting:
    """Wrap an optimizer so that every `every`-th step starts with a teleport.

    **Arguments:**

    - `optimizer`: a `torch.optim` optimizer over `model.parameters()`.
    - `every`: teleport before steps `0, every, 2 every, ...`.
    - `model`, `group`, `loss_fn`: as in `teleport`; `steps`, `lr`: its ascent settings.

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
    ) -> None:
        if every < 1:
            raise GaugeError(f"Teleporting: every must be a positive integer, got {every}")
        self.optimizer, self.every = optimizer, every
        self.model, self.group, self.loss_fn = model, group, loss_fn
        self.steps, self.lr = steps, lr
        self.count = 0
        self.teleports = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, batch: tuple[Tensor, Tensor]) -> None:
        if self.count % self.every == 0:
            moved = teleport(
                self.model, self.group, self.loss_fn, batch, steps=self.steps, lr=self.lr
            )
            load_state(self.model, {n: p.detach() for n, p in moved.named_parameters()})
            self.optimizer.state.clear()
            self.teleports += 1
            self.optimizer.zero_grad()
            x, y = batch
            self.loss_fn(self.model(x), y).backward()
        self.optimizer.step()
        self.count += 1
