"""The bookkeeping of `benchmarks/quantize_transformers.py`: the CNN's folds, their pooling and
the paired sign test behind the verdicts."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location(
    "quantize_transformers", ROOT / "benchmarks" / "quantize_transformers.py"
)
qt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qt)
from transformer_tasks import CNN_FOLDS, cnn_split, load_task, task_folds  # noqa: E402


def test_cnn_folds_partition_the_digits_and_fold_0_is_the_fixed_split() -> None:
    tests = []
    for k in range(CNN_FOLDS):
        pool, test = cnn_split(k)
        assert len(pool) + len(test) == 1797
        assert not set(pool.tolist()) & set(test.tolist())
        assert torch.all(pool[1:] > pool[:-1])  # in order: the validation part is its tail
        tests.append(test)
    ids = torch.cat(tests)
    assert torch.equal(ids.sort().values, torch.arange(1797))
    pool, test = cnn_split(0)
    assert torch.equal(pool, torch.arange(1437)) and torch.equal(test, torch.arange(1437, 1797))
    assert task_folds("cnn") == CNN_FOLDS and task_folds("decoder") == 1
    with pytest.raises(ValueError, match="fold"):
        cnn_split(CNN_FOLDS)
    with pytest.raises(ValueError, match="one fold"):
        load_task("decoder", 1)


def _fold(acc: float, kl: float, misses: list[int], n: int, note: str = "") -> list[dict]:
    label = "cnn"
    return [
        {"model": label, "method": "float", "metric": "accuracy", "float": (1.0, 0.0),
         "w4": (1.0, 0.0), "scored": n},
        {"model": label, "method": "peer", "preserved": 1e-7, "w4": (acc, kl),
         "misses": {"w4": misses}, "note": note},
    ]  # fmt: skip


def test_pool_folds_weights_by_scored_examples_and_unites_misses() -> None:
    a = _fold(0.9, 0.01, [3], 10, "2 regions")
    b = _fold(0.8, 0.04, [12, 17], 30, "2 regions")
    b[1]["preserved"] = 3e-7
    b[1]["w4g32"] = (0.5, 0.5)  # one fold only: no pooled cell
    rows = qt.pool_folds([a, b], ["w4", "w4g32"])
    peer = rows[1]
    assert peer["model"] == "cnn, 2 folds"
    assert peer["w4"][0] == pytest.approx((0.9 * 10 + 0.8 * 30) / 40)
    assert peer["w4"][1] == pytest.approx((0.01 * 10 + 0.04 * 30) / 40)
    assert peer["folds"]["w4"] == [(0.9, 0.01), (0.8, 0.04)]
    assert "w4g32" not in peer
    assert peer["misses"]["w4"] == [3, 12, 17]
    assert peer["preserved"] == 3e-7 and peer["note"] == "2 regions"
    assert rows[0]["scored"] == 40 and rows[0]["float"] == (1.0, 0.0)
    # notes that differ are kept per fold
    b[1]["note"] = "1 region"
    assert qt.pool_folds([a, b], ["w4"])[1]["note"] == "fold 0: 2 regions; fold 1: 1 region"
    # one fold: the rows themselves
    assert qt.pool_folds([a], ["w4"]) is a


def test_pool_folds_refuses_folds_with_different_methods() -> None:
    a, b = _fold(0.9, 0.0, [], 10), _fold(0.9, 0.0, [], 10)
    b[1]["method"] = "other"
    with pytest.raises(ValueError, match="different methods"):
        qt.pool_folds([a, b], ["w4"])


def test_sign_test_is_the_exact_two_sided_binomial() -> None:
    assert qt.sign_test(0, 0) == 1.0
    assert qt.sign_test(0, 3) == pytest.approx(0.25)
    assert qt.sign_test(3, 8) == pytest.approx(2 * sum(math.comb(11, i) for i in range(4)) / 2**11)
    assert qt.sign_test(8, 3) == qt.sign_test(3, 8)
    assert qt.sign_test(0, 10) < 0.01


def test_chosen_element_names_the_element_equalize_returned() -> None:
    one = ["validation: identity 3, searched 2; chose searched (lowest)"]
    assert qt.chosen_element(one) == "searched"
    assert qt.chosen_element(["online rotations: not kept (0: none proposed)"]) == ""
    # nothing proposed: one search, then the finalists
    last = "online rotations on validation: weights only 2, weights-only element + all 4 online 1"
    lines = [*one, f"{last}; kept weights-only element + all 4 online (lowest)"]
    assert qt.chosen_element(lines) == "searched"
    two = [
        "online rotations: kept (1: down)",
        "weights only: validation: identity 3, learned 2; chose learned (lowest)",
        "validation: identity 3, activation-aware 1; chose activation-aware (lowest)",
    ]
    final = "online rotations on validation: weights only 2, ...; kept {} (lowest)"
    assert qt.chosen_element([*two, final.format("online element + 1 proposed online")]) == (
        "activation-aware"
    )
    for kept in ("weights-only element + all 9 online", "weights only"):
        assert qt.chosen_element([*two, final.format(kept)]) == "learned"
