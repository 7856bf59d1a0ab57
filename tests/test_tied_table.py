"""A token table tied under several modules (BART's `shared`, the encoder's and the
decoder's lookups): its rows move along `1` when every lookup reaches only LayerNorms, the
factor moving every name of the parameter alike. With a tied output head reading the same
table (`BartForConditionalGeneration`) the move changes the logits, and is not offered."""

from __future__ import annotations

import copy
import dataclasses

import torch

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.discovery import INTERNAL_ERROR
from tiny_hf import SEQ2SEQ, tiny_hf


def _bart(cls: str):
    return tiny_hf(cls, "BartConfig", decoder=True, **SEQ2SEQ)


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)[0]


def test_tied_table_rows_move_along_one() -> None:
    model, x = _bart("BartModel")
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    f = next(f for f in group.factors if f.name == "center:shared")
    assert f.dim == 24  # every token row
    names = {t.weight for t in f.terms}
    assert names == {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-12
    ref, gen = _out(model, x), torch.Generator().manual_seed(0)
    moved = group.act(model, {f.name: f.sample(gen, torch.float64, 1.0)})
    assert not torch.equal(moved.shared.weight, model.shared.weight)
    assert moved.encoder.embed_tokens.weight is moved.shared.weight
    assert relative_error(_out(moved, x), ref) < 1e-12


def test_a_tied_head_keeps_the_table_fixed() -> None:
    """Negative: the tied LM head reads the table, so moving its rows along `1` changes the
    logits; discovery does not offer it."""
    plain, x = _bart("BartModel")
    f = next(f for f in gaugenet.symmetries(plain, x).factors if f.name == "center:shared")
    model, _ = _bart("BartForConditionalGeneration")
    assert model.lm_head.weight is model.model.shared.weight
    group = gaugenet.symmetries(model, x)
    assert not any(g.name.startswith("center:") and "shared" in g.name for g in group.factors)
    moved = copy.deepcopy(model)
    c = torch.randn(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        moved.model.shared.weight.add_(c[:, None])
    assert relative_error(_out(moved, x), _out(model, x)) > 1e-3
    assert f.dim == 24


def test_a_vector_moves_from_the_tied_table_into_both_position_tables() -> None:
    """`shared −= v`, and each position table (encoder's, decoder's) `+= v` with `v ⊥ 1`:
    both sums keep their value. The move completes BartModel (n − rank J)."""
    model, x = _bart("BartModel")
    group = gaugenet.symmetries(model, x)
    (f,) = [f for f in group.factors if f.name.startswith("move:shared->")]
    assert f.dim == 8 - 1
    assert set(f.terms[0].to) == {
        "encoder.embed_positions.weight",
        "decoder.embed_positions.weight",
    }
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete", report
    ref = _out(model, x)
    moved = group.act(model, {f.name: f.sample(torch.Generator().manual_seed(2), scale=1.0)})
    assert relative_error(_out(moved, x), ref) < 1e-12
    assert (moved.shared.weight - model.shared.weight).abs().max() > 1e-2
    # negative: the same vector into the encoder's positions only moves the decoder's sum
    t = f.terms[0]
    one_side = dataclasses.replace(t, to=t.to[:1], coef=t.coef[:1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    one_side(state, torch.ones(7, dtype=torch.float64))
    wrong = copy.deepcopy(model)
    wrong.load_state_dict(state)
    assert relative_error(_out(wrong, x), ref) > 1e-3
