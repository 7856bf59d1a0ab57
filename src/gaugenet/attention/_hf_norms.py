"""The LayerNorm structure of a Hugging Face BERT-style (post-norm) encoder.

Layer `i` reads `h_i` (the embeddings' LayerNorm for `i = 0`, else the previous layer's
output LayerNorm) with its query, key and value projections, and computes

    a_i = LN_a(h_i + attention.output.dense(ctx)),
    h_{i+1} = LN_o(a_i + output.dense(GELU(intermediate.dense(a_i)))).

The factors this gives, beyond the attention's own (see `discovery/_kernel.py`,
`discovery/_centering.py`, `discovery/_shifts.py` for why each is exact):

- the mean-subtraction kernel of every LayerNorm in the rows of its readers: `h_i` in the
  query, key and value rows, `a_i` in `intermediate.dense`, the last `h` in the pooler;
- the outputs along `1` of `attention.output.dense` and `output.dense`, which only the
  next LayerNorm reads (through the residual sum);
- the shift `β` of `h_i`'s and `a_i`'s LayerNorms, taken back by the query and value
  biases (the key bias needs none: softmax ignores a shift of every key) or the
  intermediate bias, and, in the residual sum, by the bias of the dense layer added to it;
- the embedding tables, which only the embeddings' LayerNorm reads through their sum:
  every row along `1`, and a vector moved from the token-type table into the position or
  word table (each token reads exactly one row of each), orthogonal to `1` (the part along
  `1` is already the rows' own).

The last `h` is the model's output, so its LayerNorm has no shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..discovery._centering import CenteredOutputFactor, centered_output
from ..discovery._kernel import LayerNormKernelFactor, ReaderSlot, ill_conditioned, kernel_factor
from ..discovery._shifts import AbsorbedShiftFactor, layernorm_shift
from ..groups import Breaker, TranslationFactor
from ..groups._base import State

__all__ = ["bert_norm_factors"]


def _ln(model: nn.Module, name: str) -> nn.LayerNorm | None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    ok = isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1
    return m if ok else None


def _lin(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def _kernel(
    name: str, ln: nn.LayerNorm, slots: list[ReaderSlot], breakers: list[Breaker]
) -> list[LayerNormKernelFactor]:
    reason = ill_conditioned(ln.weight)
    if reason is not None:
        breakers.append(Breaker(name, reason))
        return []
    return [kernel_factor(name, ln, slots)]


def _slot(model: nn.Module, name: str, *, bias: bool = True) -> ReaderSlot:
    lin = _lin(model, name)
    b = f"{name}.bias" if bias and lin.bias is not None else None
    return ReaderSlot(f"{name}.weight", b, 0, lin.out_features)


def _centered(model: nn.Module, name: str) -> CenteredOutputFactor:
    return centered_output(name, _lin(model, name))


def _shift(
    name: str, E: int, readers: list[tuple[str, str]], residual: str | None
) -> AbsorbedShiftFactor:
    consumers = [(w, b, None) for w, b in readers]
    return layernorm_shift(name, E, consumers, [residual] if residual else [])


def bert_norm_factors(model: nn.Module, layers: list[str]) -> tuple[list, list[Breaker]]:
    """The factors above for a BERT-style model whose attention blocks are
    `f"{layer}.attention"` for the `layers` in order (e.g. `encoder.layer.3`), and the
    breakers met (LayerNorms with a vanishing `γ`). Returns nothing when the modules are
    not laid out as expected."""
    if not layers or _ln(model, "embeddings.LayerNorm") is None:
        return [], []
    out: list = []
    breakers: list[Breaker] = []
    h = "embeddings.LayerNorm"
    for p in layers:
        a, o = f"{p}.attention.output.LayerNorm", f"{p}.output.LayerNorm"
        q, k, v = (f"{p}.attention.self.{x}" for x in ("query", "key", "value"))
        dense, inter, out_dense = (
            f"{p}.attention.output.dense",
            f"{p}.intermediate.dense",
            f"{p}.output.dense",
        )
        lns, lins = (_ln(model, h), _ln(model, a), _ln(model, o)), (q, k, v, dense, inter)
        if any(x is None for x in lns) or any(_lin(model, x) is None for x in (*lins, out_dense)):
            return [], []
        E = lns[0].normalized_shape[0]
        # h_i: read by q, k, v; added to attention.output.dense in the residual sum
        readers = [_slot(model, q), _slot(model, k, bias=False), _slot(model, v)]
        out += _kernel(h, lns[0], readers, breakers)
        if lns[0].bias is not None and _lin(model, dense).bias is not None:
            readers = [
                (f"{x}.weight", f"{x}.bias") for x in (q, v) if _lin(model, x).bias is not None
            ]
            out.append(_shift(h, E, readers, f"{dense}.bias"))
        out.append(_centered(model, dense))
        # a_i: read by intermediate.dense; added to output.dense in the residual sum
        out += _kernel(a, lns[1], [_slot(model, inter)], breakers)
        if lns[1].bias is not None and _lin(model, inter).bias is not None:
            residual = f"{out_dense}.bias" if _lin(model, out_dense).bias is not None else None
            if residual is not None:
                out.append(_shift(a, E, [(f"{inter}.weight", f"{inter}.bias")], residual))
        out.append(_centered(model, out_dense))
        h = o
    if _lin(model, "pooler.dense") is not None:
        out += _kernel(h, _ln(model, h), [_slot(model, "pooler.dense")], breakers)
    out += _embedding_factors(model)
    return out, breakers


# -- embeddings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RowsAlongOne:
    """`weight[r] += c[r] 1` for every row `r` of an embedding table `(rows, features)`."""

    weight: str

    def __call__(self, new: State, c: Tensor) -> None:
        W = new[self.weight]
        new[self.weight] = W + c.to(W.dtype)[:, None]


class CenteredRowsFactor(TranslationFactor):
    """`R^rows`: an embedding table's rows along `1`, removed by the LayerNorm of the sum."""

    def params(self) -> tuple[str, ...]:
        return (self.terms[0].weight,)

    def canonical(self, state: State) -> Tensor:
        """Rows of zero mean."""
        return -state[self.terms[0].weight].mean(1)


def _complement_basis(d: int, dtype: torch.dtype) -> Tensor:
    """An orthonormal basis `(d, d − 1)` of the vectors orthogonal to `1` (Householder)."""
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1.0
    w = torch.ones(d, dtype=torch.float64) / d**0.5 - e
    H = torch.eye(d, dtype=torch.float64) - 2 * torch.outer(w, w) / (w @ w)
    return H[:, 1:].to(dtype)  # H maps e_0 to 1/√d, so its other columns span 1^⊥


@dataclass(frozen=True)
class MoveBetweenTables:
    """`to[:] += v`, `from_[:] −= v` for `v = B z` with `B` a basis of `1^⊥`."""

    to: str
    from_: str
    features: int

    def __call__(self, new: State, z: Tensor) -> None:
        W = new[self.to]
        v = _complement_basis(self.features, W.dtype) @ z.to(W.dtype)
        new[self.to] = W + v
        new[self.from_] = new[self.from_] - v.to(new[self.from_].dtype)


class TableShiftFactor(TranslationFactor):
    """`R^(features − 1)`: a vector moved between two embedding tables whose rows are summed
    (one row of each per token)."""

    def params(self) -> tuple[str, ...]:
        t = self.terms[0]
        return (t.to, t.from_)

    def canonical(self, state: State) -> Tensor:
        """The move that leaves the target table's mean row along `1` only (the rows' own
        factor then centers it): the canonical gauge."""
        t = self.terms[0]
        W = state[t.to]
        B = _complement_basis(t.features, W.dtype)
        return -(B.T @ W.mean(0))


def _embedding_factors(model: nn.Module) -> list:
    names = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    tables = {}
    for n in names:
        try:
            m = model.get_submodule(f"embeddings.{n}")
        except AttributeError:
            continue
        if isinstance(m, nn.Embedding) and m.max_norm is None:
            tables[n] = m
    if set(tables) != set(names):
        return []  # without all three the embeddings' sum is not known: nothing claimed
    out: list = [
        CenteredRowsFactor(
            f"center:embeddings.{n}",
            m.num_embeddings,
            terms=(RowsAlongOne(f"embeddings.{n}.weight"),),
            modules=(f"embeddings.{n}",),
        )
        for n, m in tables.items()
    ]
    d = tables["word_embeddings"].embedding_dim
    for n in ("word_embeddings", "position_embeddings"):
        out.append(
            TableShiftFactor(
                f"move:embeddings.token_type_embeddings->{n}",
                d - 1,
                terms=(
                    MoveBetweenTables(
                        f"embeddings.{n}.weight", "embeddings.token_type_embeddings.weight", d
                    ),
                ),
                modules=(f"embeddings.{n}", "embeddings.token_type_embeddings"),
            )
        )
    return out
