"""Token lookups times one constant number (Pegasus's and Gemma's `√d`) before a stream that
only LayerNorms read: their rows still move along `1`, `s (E + c 1) = s E + s c 1`. A
per-feature product (a vector, not a number) does not pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery._embeddings import RowsAlongOne
from gaugenet.discovery.rules._examples import token_ids
from tiny_hf import SEQ2SEQ, tiny_hf

F64 = torch.float64


class _Scaled(nn.Module):
    """`tok(ids) · s + pos`, then `LN → Linear`; `s` a number, or a vector with `vector`."""

    def __init__(self, vector: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 4), nn.Embedding(5, 4)
        self.ln, self.out = nn.LayerNorm(4), nn.Linear(4, 3)
        scale = torch.tensor([1.0, 2.0, 0.5, 3.0]) if vector else torch.tensor(2.0)
        self.register_buffer("scale", scale)
        self.register_buffer("positions", torch.arange(5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.tok(ids) * self.scale + self.pos(self.positions)))


def _model(vector: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _Scaled(vector).to(F64), token_ids(10, 30, 5)


def _center(group: gaugenet.GaugeGroup, table: str):
    return [f for f in group.factors if f.name == f"center:{table}"]


def test_rows_of_a_scaled_lookup_move_along_ones() -> None:
    model, ids = _model()
    group = gaugenet.symmetries(model, ids)
    (f,) = _center(group, "tok")
    assert f.dim == 10
    report = gaugenet.certify(model, ids, group=group)
    assert report.verdict == "complete", report
    g = group.sample(torch.Generator().manual_seed(1))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
    assert (moved.tok.weight - model.tok.weight).abs().max() > 1e-2


def test_a_per_feature_product_moves_them_off_ones() -> None:
    model, ids = _model(vector=True)
    group = gaugenet.symmetries(model, ids)
    assert not _center(group, "tok")
    # the same move the scalar product allows: every row along `1`
    new = {k: v.clone() for k, v in model.state_dict().items()}
    RowsAlongOne("tok.weight")(new, torch.linspace(-1.0, 1.0, 10, dtype=F64))
    wrong = _Scaled(vector=True).to(F64)
    wrong.load_state_dict(new)
    assert gaugenet.invariance_error(model, wrong, ids) > 1e-2


@pytest.mark.slow
def test_pegasus_tied_table_scaled_by_sqrt_d() -> None:
    """Pegasus scales the encoder's and decoder's lookups of one tied table by `√d`: the
    rows of `shared` move along `1` under every name (24 rows), and a vector moves out of
    it into both position tables, times `√d`; the group is complete."""
    model, inputs = tiny_hf(
        "PegasusModel", "PegasusConfig", decoder=True, **SEQ2SEQ, scale_embedding=True
    )
    assert model.config.scale_embedding
    group = gaugenet.symmetries(model, inputs)
    (f,) = [f for f in group.factors if f.name == "center:shared"]
    assert f.dim == 24
    # pre-LN: every LayerNorm reaches the lookups; the first one lists the position tables
    (move,) = [f for f in group.factors if f.name.startswith("move:shared->")]
    assert move.terms[0].coef == pytest.approx((8**0.5, 8**0.5))  # √d over 1
    assert gaugenet.certify(model, inputs, group=group).verdict == "complete"
    g = group.sample(torch.Generator().manual_seed(2))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, inputs) < 1e-12
    assert (moved.shared.weight - model.shared.weight).abs().max() > 1e-2
