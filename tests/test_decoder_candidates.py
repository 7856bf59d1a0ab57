"""The bookkeeping of `benchmarks/decoder_candidates.py`: its online layer sets, the rank
correlations and the contenders behind the README's reading of the decoder's misses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).parent))
from decoder_candidates import contenders, online_sets, rank_correlations
from gaugenet.apply import QuantScheme, quantize, rotate_inputs_online
from loud_llama import loud_llama


def _rows(val_kl, val_dl, held_kl, held_dl) -> list[dict]:
    return [
        {"val_kl": a, "val_dl": b, "held_kl": c, "held_dl": d}
        for a, b, c, d in zip(val_kl, val_dl, held_kl, held_dl)
    ]


def test_rank_correlations_are_spearman_of_each_pair() -> None:
    up = [1.0, 2.0, 3.0, 4.0, 5.0]
    rows = _rows(up, up, [10.0, 20.0, 30.0, 40.0, 50.0], [5.0, 4.0, 3.0, 2.0, 1.0])
    rho = rank_correlations(rows)
    assert rho["val KL ~ held KL"] == pytest.approx(1.0)
    assert rho["val ΔL ~ held ΔL"] == pytest.approx(-1.0)
    assert rho["held KL ~ held ΔL"] == pytest.approx(-1.0)
    # a monotone transform keeps the ranks; one swap moves ρ to 1 − 6·2/(5·24) = 0.9
    rows = _rows(up, [1.0, 3.0, 2.0, 4.0, 5.0], [v**3 for v in up], up)
    rho = rank_correlations(rows)
    assert rho["val KL ~ held KL"] == pytest.approx(1.0)
    assert rho["val ΔL ~ held ΔL"] == pytest.approx(0.9)


def test_contenders_are_within_the_factor_of_the_lowest_validation_kl() -> None:
    rows = _rows([4.0, 5.0, 5.1, 20.0], [0.0] * 4, [0.0] * 4, [0.0] * 4)
    assert [r["val_kl"] for r in contenders(rows)] == [4.0, 5.0]
    assert [r["val_kl"] for r in contenders(rows, factor=5.0)] == [4.0, 5.0, 5.1, 20.0]


def test_online_sets_name_layers_that_rotate_without_changing_the_function() -> None:
    model, x, group, _ = loud_llama()
    sets = online_sets(model, x, QuantScheme.parse("w8a8"), group)
    assert list(sets) == ["no online", "proposed online", "unreached online", "all online"]
    assert sets["no online"] == ()
    assert set(sets["unreached online"]) == {
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
    }
    assert set(sets["proposed online"]) <= set(sets["all online"])
    assert len(sets["all online"]) == 8  # q, k, v, o, gate, up, down, lm_head
    with torch.no_grad():
        y = model(**x).logits
        for names in sets.values():
            moved = rotate_inputs_online(model, names)
            assert torch.allclose(moved(**x).logits, y, atol=1e-11)
        # the rotations are real: rounding sees them (negative check)
        q0 = quantize(model, "w8a8")(**x).logits
        q1 = quantize(rotate_inputs_online(model, sets["all online"]), "w8a8")(**x).logits
        assert (q0 - q1).abs().max() > 1e-6
