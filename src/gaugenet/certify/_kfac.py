"""A Kronecker-factored (K-FAC) preconditioner for `P JᵀJ P`: per `nn.Linear`, the inverse
of an approximation `A ⊗ G` of its diagonal block of `JᵀJ`; a damped Jacobi diagonal for
every other parameter."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._jacobian import FlatModel, flatten_out, measuring

__all__ = ["preconditioner"]

Operator = Callable[[Tensor], Tensor]


@dataclass
class _KronBlock:
    """`(G ⊗ A + δ)⁻¹` for one `nn.Linear`: `G` `(out, out)` from output gradients, `A`
    `(in + 1, in + 1)` from inputs with a 1 appended for the bias, both eigendecomposed."""

    weight: int  # offset of the weight in the flat vector
    bias: int | None
    shape: tuple[int, int]
    ug: Tensor
    ua: Tensor
    inv: Tensor  # (out, in [+ 1]): 1 / (d_G d_Aᵀ + δ)

    def apply(self, v: Tensor, out: Tensor) -> None:
        o, i = self.shape
        w = v[self.weight : self.weight + o * i].view(o, i)
        if self.bias is not None:
            w = torch.cat([w, v[self.bias : self.bias + o, None]], 1)
        z = self.ug @ (((self.ug.T @ w @ self.ua) * self.inv) @ self.ua.T)
        out[self.weight : self.weight + o * i] = z[:, :i].reshape(-1)
        if self.bias is not None:
            out[self.bias : self.bias + o] = z[:, i]


def _eligible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """`nn.Linear` modules whose weight (and bias) belong to no other module."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and uses[id(m.weight)] == 1
        and (m.bias is None or uses[id(m.bias)] == 1)
    }


def _probe_gradients(
    fm: FlatModel, layers: dict[str, nn.Linear], n_probes: int, gen: torch.Generator
) -> tuple[dict[str, tuple[Tensor, Tensor]], list[Tensor]]:
    """Inputs and output gradients of the `layers` called once, and gradients of every
    parameter, for `n_probes` random ±1 cotangents `u` of the outputs (so that
    `E[(Jᵀu)(Jᵀu)ᵀ] = JᵀJ`)."""
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}

    def record(name: str, args: tuple, out: Tensor) -> Tensor:
        seen[name].append((args[0].detach(), out))
        return out.clone()  # an in-place op downstream (ReLU(inplace=True)) leaves `out` be

    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: record(name, args, out))
        for name, m in layers.items()
    ]
    for p in fm.model.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), measuring():
            y = flatten_out(fm.model(*fm.args))
    finally:
        for h in hooks:
            h.remove()
    once = {name: uses[0] for name, uses in seen.items() if len(uses) == 1}
    params = [p for _, p in fm.model.named_parameters()]  # frozen ones too (our copy)
    outs = [out for _, out in once.values()]
    u = torch.randint(0, 2, (n_probes, y.numel()), generator=gen).to(y.dtype) * 2 - 1
    try:
        grads = torch.autograd.grad(
            y, outs + params, u, is_grads_batched=True, allow_unused=True, retain_graph=True
        )
    except Exception:  # no batching rule for some backward: one probe at a time
        per = [
            torch.autograd.grad(y, outs + params, ui, allow_unused=True, retain_graph=True)
            for ui in u
        ]
        grads = tuple(
            None if per[0][j] is None else torch.stack([g[j] for g in per])
            for j in range(len(outs) + len(params))
        )
    grads = [
        torch.zeros(n_probes, *t.shape, dtype=y.dtype) if g is None else g
        for g, t in zip(grads, outs + params)
    ]
    layer_grads = {name: (inp, g) for (name, (inp, _)), g in zip(once.items(), grads[: len(outs)])}
    return layer_grads, grads[len(outs) :]


def _damped_inverse(d: Tensor, damping: float, scale: float) -> Tensor:
    """`1 / (d + δ)`, `δ = damping · max(d)` (`damping · scale` where `d` is all zero)."""
    top = float(d.max()) if d.numel() else 0.0
    return 1.0 / (d.clamp_min(0) + damping * (top if top > 0 else scale))


def _kron_block(
    fm: FlatModel,
    name: str,
    m: nn.Linear,
    inp: Tensor,
    grad: Tensor,
    damping: float,
    scale: float,
) -> _KronBlock:
    offsets = fm.offsets()
    o, i = m.weight.shape
    a = inp.reshape(-1, i)
    if m.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    g = grad.reshape(-1, o)
    da, ua = torch.linalg.eigh(a.T @ a)
    dg, ug = torch.linalg.eigh(g.T @ g / (grad.shape[0] * a.shape[0]))
    inv = _damped_inverse(dg.clamp_min(0)[:, None] * da.clamp_min(0)[None, :], damping, scale)
    bias = offsets[f"{name}.bias" if name else "bias"] if m.bias is not None else None
    return _KronBlock(offsets[f"{name}.weight" if name else "weight"], bias, (o, i), ug, ua, inv)


def preconditioner(
    fm: FlatModel, *, n_probes: int = 16, damping: float = 1e-6, gen: torch.Generator
) -> tuple[Operator, str]:
    """`v ↦ M v` with `M ≈ (JᵀJ)⁻¹` block-diagonal: K-FAC blocks `(G ⊗ A + δ)⁻¹` for each
    `nn.Linear` (weight and bias together) and `1 / (diag JᵀJ + δ)` for every other
    parameter, the diagonal estimated from the same random probes (Hutchinson)."""
    layers = _eligible_linears(fm.model)
    try:
        layer_grads, param_grads = _probe_gradients(fm, layers, n_probes, gen)
    except Exception:  # the model does not run under plain autograd: no preconditioner
        return (lambda v: v), "none"
    diag = torch.cat([(g**2).mean(0).reshape(-1) for g in param_grads])
    scale = float(diag.max()) if diag.numel() and float(diag.max()) > 0 else 1.0
    blocks = [
        _kron_block(fm, name, layers[name], inp, g, damping, scale)
        for name, (inp, g) in layer_grads.items()
    ]
    covered = torch.zeros(fm.theta.numel(), dtype=torch.bool)
    for b in blocks:
        o, i = b.shape
        covered[b.weight : b.weight + o * i] = True
        if b.bias is not None:
            covered[b.bias : b.bias + o] = True
    inv_diag = torch.ones(fm.theta.numel(), dtype=fm.theta.dtype)
    for start, size in zip(fm.offsets().values(), fm.sizes):
        inv_diag[start : start + size] = _damped_inverse(diag[start : start + size], damping, scale)
    inv_diag[covered] = 0.0

    def apply(v: Tensor) -> Tensor:
        out = v * inv_diag
        for b in blocks:
            b.apply(v, out)
        return out

    kind = "K-FAC" if blocks else ""
    if not bool(covered.all()):
        kind = f"{kind} + Jacobi diagonal" if kind else "Jacobi diagonal"
    return apply, kind
