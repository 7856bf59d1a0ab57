"""Noether charges of gradient flow: one conserved quantity per continuous gauge direction.

If a loss is invariant under a linear action `θ ↦ exp(s A) θ`, then `⟨A θ, ∇L(θ)⟩ = 0`, and
under gradient flow `θ̇ = −∇L` the quadratic form `Q = ½ θᵀ A θ` is conserved whenever `A` is
symmetric (`Q̇ = −θᵀ A ∇L = 0`). Every charge below is of this kind, read off the factor's
terms, so it exists for every group `gaugenet.symmetries` finds:

- `RescalingFactor`, `Scale(param, index, power)`: unit `k` scales its entries by `α_k^power`,
  so `Q_k = Σ_terms power · Σ_{index = k} θ²` (per hidden unit of a ReLU MLP:
  `‖w_in‖² + b² − ‖w_out‖²`). An `OffsetScale` (a gain read as `θ + c`) moves by
  `θ ↦ α (θ + c) − c`, linear in `θ + c`, so it contributes `power · (θ + c)²`. A
  `BatchNormShift` term contributes `−γ_k²`; its action on the
  shift `β` is affine in `γ` (not symmetric), so the charge of such a channel is conserved
  only when its running mean vanishes.
- `MonomialScaleFactor` (products and powers, ties): direction `z_j` scales class `c` by
  `exp(B_cj)`, so `Q_j = Σ_c B_cj q_c` with `q_c` the class charges above (ReGLU unit `i`:
  `‖g_i‖² − ‖d_i‖²` and `‖u_i‖² − ‖d_i‖²`, `d_i` down's column).
- `GLFactor`, `MatTerm(param, axis, offset, mode)`: the block `W` (`d` rows after moving
  `axis` first) moves as `W ↦ M(g) W`; the tangent is `±ξ W` (modes `G`, `inv`) or `±ξᵀ W`
  (`T`, `invT`). Invariance for every `ξ` says `Σ_terms ± ∇W Wᵀ = 0` (transposed for the
  `T` modes), so `Q = Σ_terms ± W Wᵀ` (`+` for `G`, `T`; `−` for `inv`, `invT`) is a
  conserved symmetric `(b, d, d)` matrix. For attention: `W_q ↦ G⁻ᵀ`-type and
  `W_k ↦ G`-type terms give `W_qᵀ W_q − W_kᵀ W_k` in the usual layout; value-output gives
  `W_o-block W_o-blockᵀ − W_v W_vᵀ`-type matrices.
- `AlgebraFactor` (a subalgebra `𝒜` of `gl(d)`, e.g. the commutant of rotary embeddings,
  or `GL` shared by the query heads of a key-value group): the same `Q`, summed over the
  blocks that share an element, read along the algebra: `Q_k = ⟨B_k, Q⟩` for each basis
  matrix `B_k` (`(b, m)`); conserved because `𝒜` is closed under transposition. The
  orthogonal factors of residual streams have skew generators, so their charge vanishes
  identically and is left out.
- `AffineFactor`: the `GL(d)` part gives `Σ_right wᵀ w − Σ_left [w b][w b]ᵀ` (`(d, d)`);
  the translation part has no conserved quantity (its tangent field is not a gradient).
- `TranslationFactor` made of plain `Shift` terms (the softmax key-bias shift): the shifted
  entries move by a constant, so their sum is conserved (a linear charge). Shifts that a
  later layer absorbs through a weight (a bias into BatchNorm, the value bias into the
  output bias) have a tangent field that depends on that weight and is no gradient: they
  have no charge and are left out.
- `FreeFactor` (entries no output reads): the loss gradient on them is zero, so every such
  entry is conserved itself: `Q = θ_S` (`(n,)`, in the factor's element order).

With weight decay `λ` (`θ̇ = −∇L − λ θ`) the quadratic charges decay as `exp(−2 λ t)` and
the linear ones as `exp(−λ t)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..groups import (
    AffineFactor,
    AlgebraFactor,
    BatchNormShift,
    FreeFactor,
    GaugeGroup,
    GLFactor,
    MonomialScaleFactor,
    RescalingFactor,
    Scale,
    Shift,
    TranslationFactor,
)
from ..groups import model_state as _model_state
from ..groups._algebra import Repeat

__all__ = ["NoetherRecorder", "noether_charges"]

State = Mapping[str, Tensor]


def _state(model: nn.Module | State) -> State:
    if isinstance(model, nn.Module):
        return dict(model.named_parameters()) | dict(model.named_buffers())
    return model


def _monomial(f: MonomialScaleFactor, s: State) -> Tensor:
    """`Q_j = Σ_c B_cj q_c`: direction `z_j` scales class `c` by `exp(B_cj)`, so its charge
    is the class charges `q` (as for `RescalingFactor`) read along the basis."""
    return f.basis.to(next(iter(s.values())).dtype).T @ _rescaling(f, s, int(f.basis.shape[0]))


def _rescaling(f: RescalingFactor | MonomialScaleFactor, s: State, n: int | None = None) -> Tensor:
    dtype = next(iter(s.values())).dtype
    n = f.n if n is None else n
    q = torch.zeros(n + 1, dtype=dtype)  # slot n collects entries not scaled by f
    for term in f.terms:
        if isinstance(term, Scale):
            p = term.value(s[term.param])  # an offset gain's charge: `(w + c)²`
            idx = term.index.expand_as(p).reshape(-1)
            q = q.index_add(0, idx, term.power * p.reshape(-1) ** 2)
        elif isinstance(term, BatchNormShift):
            q = q.index_add(0, term.index, -(s[term.weight] ** 2))
    return q[:n]


def _gl(f: GLFactor, s: State) -> Tensor:
    q = torch.zeros(f.b, f.d, f.d, dtype=next(iter(s.values())).dtype)
    for t in f.terms:
        p = s[t.param].movedim(t.axis, 0)
        W = p[t.offset : t.offset + f.b * f.d].reshape(f.b, f.d, -1)
        sign = 1.0 if t.mode in ("G", "T") else -1.0
        q = q + sign * W @ W.transpose(-1, -2)
    return q


def _algebra(f: AlgebraFactor, s: State) -> Tensor:
    q = torch.zeros(f.b, f.d, f.d, dtype=next(iter(s.values())).dtype)
    for term in f.terms:
        t, times = (term.term, term.times) if isinstance(term, Repeat) else (term, 1)
        p = s[t.param].movedim(t.axis, 0)
        idx = t.index(f.b * times, f.d).reshape(-1)
        W = p[idx].reshape(f.b, times, f.d, -1)
        sign = 1.0 if t.mode in ("G", "T") else -1.0
        q = q + sign * (W @ W.transpose(-1, -2)).sum(1)
    if f.basis is None:
        return q
    return torch.einsum("bij,kij->bk", q, f.basis.to(q.dtype))


def _affine(f: AffineFactor, s: State) -> Tensor:
    q = torch.zeros(f.d, f.d, dtype=next(iter(s.values())).dtype)
    for t in f.terms:
        w = s[t.weight]
        if t.side == "left":
            wb = w if t.bias is None else torch.cat([w, s[t.bias][:, None]], 1)
            q = q - wb @ wb.T
        else:
            q = q + w.T @ w
    return q


def _translation(f: TranslationFactor, s: State) -> Tensor:
    return sum(s[t.param][t.offset : t.offset + f.n] for t in f.terms)


def noether_charges(model: nn.Module | State, group: GaugeGroup) -> dict[str, Tensor]:
    """The conserved quantity of every continuous factor of `group` at `model`.

    **Arguments:**

    - `model`: an `nn.Module` or a state dict (parameters and buffers by name); the result
      is differentiable with respect to it.
    - `group`: its gauge group (e.g. from `gaugenet.symmetries`).

    **Returns:** `{factor_name: charge}` with shapes `(n,)` for rescalings, `(b, d, d)` for
    `GLFactor`, `(d, d)` for `AffineFactor`, `(n, ...)` for translations, `(n,)` for free
    entries. Discrete factors have none and are left out. See the module docstring for the
    derivations.
    """
    s = _state(model)
    out: dict[str, Tensor] = {}
    for f in group.continuous:
        if isinstance(f, AlgebraFactor):
            out[f.name] = _algebra(f, s)
        elif isinstance(f, RescalingFactor):
            out[f.name] = _rescaling(f, s)
        elif isinstance(f, MonomialScaleFactor):
            out[f.name] = _monomial(f, s)
        elif isinstance(f, GLFactor):
            out[f.name] = _gl(f, s)
        elif isinstance(f, AffineFactor):
            out[f.name] = _affine(f, s)
        elif isinstance(f, FreeFactor):
            out[f.name] = f.entries(s)
        elif isinstance(f, TranslationFactor) and all(type(t) is Shift for t in f.terms):
            out[f.name] = _translation(f, s)
    return out


class NoetherRecorder:
    """A training callback recording the Noether charges: call it with the model after each
    step (or every few steps).

    **Arguments:** `group`: the model's gauge group.

    `recorder(model)` appends the charges; `recorder.history[name]` is `(n_calls, *shape)`;
    `recorder.drift()` is the largest change of each factor's charge from the first call,
    relative to the largest charge entry at the first call.
    """

    def __init__(self, group: GaugeGroup) -> None:
        self.group = group
        self._rows: list[dict[str, Tensor]] = []

    def __call__(self, model: nn.Module | State) -> None:
        state = _model_state(model) if isinstance(model, nn.Module) else model
        with torch.no_grad():
            self._rows.append(
                {k: v.detach().clone() for k, v in noether_charges(state, self.group).items()}
            )

    @property
    def history(self) -> dict[str, Tensor]:
        if not self._rows:
            return {}
        return {k: torch.stack([r[k] for r in self._rows]) for k in self._rows[0]}

    def drift(self) -> dict[str, float]:
        out = {}
        for k, h in self.history.items():
            scale = float(h[0].abs().max().clamp_min(1e-300))
            out[k] = float((h - h[0]).abs().max()) / scale
        return out
