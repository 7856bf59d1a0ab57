"""Choosing the element on validation inputs; smoothing strengths; the group-wise noise model."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from gaugenet import GaugeError, invariance_error
from gaugenet.apply import QuantScheme, equalize, quantize, quantize_grouped, squared_error
from gaugenet.apply._equalize import _output_noise
from gaugenet.apply._quantize import quantized_params
from gaugenet.apply._search import _slices, input_ranges, noise_model_scales, smoothing_scales
from gaugenet.apply._select import Candidate, fold_scores, select, select_simplest
from gaugenet.discovery import symmetries
from gaugenet.groups import RescalingFactor, model_state


def _cand(label: str, value: float) -> Candidate:
    return Candidate(label, {}, {"v": torch.tensor(value, dtype=torch.float64)})


def _value(state) -> float:
    return float(state["v"])


def test_select_returns_the_lowest_and_never_worse_than_the_identity(gen) -> None:
    for _ in range(50):
        vals = torch.randn(6, generator=gen, dtype=torch.float64).tolist()
        ident, others = (
            _cand("identity", vals[0]),
            [_cand(f"c{i}", v) for i, v in enumerate(vals[1:])],
        )
        chosen, scores = select(ident, others, _value)
        assert _value(chosen.state) == min(vals) <= vals[0]
        assert scores["identity"] == vals[0] and len(scores) == 6
    # ties keep the identity (plain rounding), then the first of equal candidates
    chosen, _ = select(_cand("identity", 1.0), [_cand("a", 1.0), _cand("b", 1.0)], _value)
    assert chosen.label == "identity"
    chosen, _ = select(_cand("identity", 2.0), [_cand("a", 1.0), _cand("b", 1.0)], _value)
    assert chosen.label == "a"
    # every other candidate worse: the identity
    chosen, _ = select(_cand("identity", 0.0), [_cand("a", 0.5), _cand("b", 3.0)], _value)
    assert chosen.label == "identity"


def test_select_skips_non_finite_scores_and_refuses_bad_input() -> None:
    others = [_cand("nan", math.nan), _cand("-inf", -math.inf), _cand("ok", 0.5)]
    chosen, scores = select(_cand("identity", 1.0), others, _value)
    assert chosen.label == "ok" and math.isnan(scores["nan"])
    with pytest.raises(GaugeError, match="must be callable"):
        select(_cand("identity", 1.0), others, "loss")  # type: ignore[arg-type]
    with pytest.raises(GaugeError, match="nothing to compare with"):
        select(_cand("identity", math.nan), others, _value)


def _sq(y_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((y_q - y) ** 2).sum()


def _rows(label: str, values: list[float]) -> Candidate:
    """A candidate whose rounded outputs are `values` (one row each, reference 0)."""
    return Candidate(label, {}, {"y": torch.tensor(values, dtype=torch.float64)[:, None]})


def _pick(cands: list[Candidate], distance=_sq, folds: int = 10):
    ref = torch.zeros_like(cands[0].state["y"])
    return select_simplest(cands[0], cands[1:], lambda c: c.state["y"], ref, distance, folds=folds)


def test_fold_scores_differ_by_each_folds_rows_only(gen) -> None:
    y, a, b = (torch.randn(23, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    fa, fb = fold_scores(a, y, _sq, 5), fold_scores(b, y, _sq, 5)
    for j, rows in enumerate(torch.arange(23).tensor_split(5)):
        torch.testing.assert_close(fa[j] - fb[j], _sq(a[rows], y[rows]) - _sq(b[rows], y[rows]))
    torch.testing.assert_close((fa - fb).sum(), _sq(a, y) - _sq(b, y))


def test_one_standard_error_rule_prefers_the_first_candidate_within_noise() -> None:
    """Twenty rows, ten folds, squared outputs summed. `fitted` is lowest; `simple` is
    above it by less than one standard error of their paired fold differences, so it is
    chosen; `worse` (above the identity) and a candidate out of reach are not. The
    standard error is checked against its definition, `sqrt(k) · sd_j(d_j)`."""
    ident = _rows("identity", [1.0] * 20)
    worse = _rows("worse", [1.01] * 20)
    far = _rows("far", [0.99] * 20)  # above the lowest by far more than its noise
    simple = _rows("simple", [1.0] * 10 + [0.3] * 10)
    fitted = _rows("fitted", [0.3] * 10 + [0.9] * 10)
    chosen, scores, why = _pick([ident, worse, far, simple, fitted])
    assert chosen.label == "simple" and why.startswith("within one standard error")
    pairs = (simple.state["y"] ** 2 - fitted.state["y"] ** 2).reshape(10, 2).sum(1)
    se = math.sqrt(10) * float(pairs.std())
    assert 0 < scores["simple"] - scores["fitted"] <= se
    assert f"({se:.3g})" in why
    assert scores["far"] - scores["fitted"] > math.sqrt(10) * 0.5  # beyond its own error
    # negatives: without `simple` the noisy gap to `far` is too large, and the lowest wins
    chosen, _, why = _pick([ident, worse, far, fitted])
    assert chosen.label == "fitted" and why == "lowest"
    # a candidate within noise of the lowest is taken below plain rounding, never above it
    noisy = _rows("noisy", [1.2**0.5, 1.2**0.5, 0.0, 0.0] * 5)  # 12.0, within noise of 9.0
    chosen, _, why = _pick([ident, noisy, fitted])
    assert chosen.label == "noisy" and why.startswith("within one standard error")
    chosen, scores, why = _pick([_rows("identity", [0.76] * 20), noisy, fitted])
    assert scores["identity"] < scores["noisy"] and chosen.label == "fitted" and why == "lowest"
    # every candidate above the identity: plain rounding
    chosen, _, why = _pick([ident, worse])
    assert chosen.label == "identity" and why == "lowest"


def test_one_standard_error_rule_falls_back_and_refuses_as_it_says() -> None:
    ident, simple = _rows("identity", [1.0] * 20), _rows("simple", [1.0] * 10 + [0.3] * 10)
    fitted = _rows("fitted", [0.3] * 10 + [0.9] * 10)
    # a distance that does not sum over rows: the fold differences do not add up, lowest
    chosen, _, why = _pick([ident, simple, fitted], distance=lambda a, b: (a - b).abs().amax())
    assert chosen.label == "fitted" and "does not sum over rows" in why
    # two rows: no standard error, lowest
    two = [_rows("identity", [1.0, 1.0]), _rows("s", [0.9, 0.9]), _rows("f", [0.5, 0.9])]
    chosen, _, why = _pick(two)
    assert chosen.label == "f" and "no standard error" in why
    # a scalar output: one row, lowest
    one = [Candidate(n, {}, {"y": torch.tensor(v, dtype=torch.float64)}) for n, v in
           (("identity", 1.0), ("s", 0.5))]  # fmt: skip
    chosen, _, why = _pick(one)
    assert chosen.label == "s" and "1 rows: no standard error" in why
    # a non-finite candidate is skipped, a non-finite identity refused
    chosen, scores, _ = _pick([ident, _rows("nan", [math.nan] * 20), fitted])
    assert chosen.label == "fitted" and math.isnan(scores["nan"])
    with pytest.raises(GaugeError, match="nothing to compare with"):
        _pick([_rows("identity", [math.inf] * 20), fitted])


def _mlp(seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    m = m.double().eval()
    with torch.no_grad():
        for mod in m:
            if isinstance(mod, nn.Linear):
                s = torch.exp(1.5 * torch.randn(mod.out_features, generator=g, dtype=torch.float64))
                mod.weight.mul_(s[:, None])
                mod.bias.mul_(s)
    return m


def test_equalize_on_validation_is_never_worse_than_plain_rounding() -> None:
    """Four calibration inputs and a long search overfit; the element chosen on validation
    inputs is at most plain rounding's validation noise, and the log shows at least one
    candidate that the calibration objective liked but validation did not."""
    guarded = 0
    for seed in range(4):
        m = _mlp(seed)
        x = torch.randn(260, 6, generator=torch.Generator().manual_seed(100 + seed))
        x = x.double()
        calib, val = x[:4], x[4:]
        lines: list[str] = []
        eq = equalize(m, calib, bits=3, granularity="per-channel", objective="output",
                      search=150, validation=val, log=lines.append)  # fmt: skip
        assert invariance_error(m, eq, val) < 1e-9
        with torch.no_grad():
            y = m(val)
            ident = float(squared_error(quantize(m, "w3")(val), y))
            chosen = float(squared_error(quantize(eq, "w3")(val), y))
        assert chosen <= ident * (1 + 1e-9), (seed, chosen, ident)
        (line,) = lines
        scores = {k: float(v) for k, v in re.findall(r"(\w[\w .-]*?) ([-\d.e+]+)(?:,|;)", line)}
        label, why = re.fullmatch(r"(.+?) \((.+)\)", line.rsplit("chose ", 1)[1]).groups()
        assert scores[label] == pytest.approx(chosen, rel=1e-5)  # logged to 6 digits
        assert scores[label] <= scores["identity"]
        if why == "lowest":
            assert scores[label] == min(scores.values())
        else:  # the first candidate within one standard error of the lowest
            se = float(re.fullmatch(r"within one standard error \((.+)\) of the lowest", why)[1])
            assert min(scores.values()) < scores[label] <= min(scores.values()) + se * 1.0001
        guarded += any(v > scores["identity"] for v in scores.values())
    assert guarded, "no candidate was worse than plain rounding on validation: weak test"


def test_validation_needs_the_output_objective() -> None:
    m = _mlp(0)
    x = torch.randn(8, 6, dtype=torch.float64)
    with pytest.raises(GaugeError, match="validation needs objective='output'"):
        equalize(m, x, bits=4, validation=x)


def _ln_linear() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    m = m.double().eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.rand(16, dtype=torch.float64) + 0.5)
        m[0].weight[[3, 7]] *= 40
    return m


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_smoothing_strength_moves_that_share_of_the_input_range(strength: float) -> None:
    """After SmoothQuant's scales at strength `s`, the input range of feature `j` is
    `(X_j W_j)^(1−s)` and the weight column's `(X_j W_j)^s` (float64, exact)."""
    m = _ln_linear()
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = quantized_params(m)
    group = symmetries(m, x)
    # the LayerNorm's gain → the first Linear's columns (not the ReLU's, which would scale
    # that Linear's rows too)
    scales = [
        f
        for f in group.factors
        if isinstance(f, RescalingFactor) and any(t.param == "0.weight" for t in f.terms)
    ]
    assert len(scales) == 1
    state = dict(model_state(m))
    act = input_ranges(m, x, names)
    alphas = smoothing_scales(scales, state, act, strength=strength)
    moved = state
    for f, a in zip(scales, alphas):
        moved = f.apply(moved, a)
    m2 = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    m2.load_state_dict(moved)
    assert invariance_error(m, m2.eval(), x) < 1e-12
    x1, w1 = act["1.weight"], state["1.weight"].abs().amax(0)
    x2, w2 = input_ranges(m2, x, names)["1.weight"], moved["1.weight"].abs().amax(0)
    prod = torch.log(x1 * w1)
    torch.testing.assert_close(torch.log(x2), (1 - strength) * prod, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.log(w2), strength * prod, rtol=0, atol=1e-10)
    with pytest.raises(GaugeError, match="strength must be in"):
        smoothing_scales(scales, state, act, strength=1.5)


def test_noise_model_slices_are_the_grouped_quantizer_steps(gen: torch.Generator) -> None:
    w = torch.randn(6, 20, generator=gen, dtype=torch.float64)  # groups of 8: last has 4
    step = _slices(w.abs(), True, 8).amax(1).reshape(6, 3) / 7
    per_entry = step.repeat_interleave(8, 1)[:, :20]
    k = quantize_grouped(w, 4, 8) / per_entry
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-12)
    assert int(k.abs().amax()) == 7
    # a group as wide as the row is one step per channel: the same scales as per channel
    m = _mlp(1)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    names = quantized_params(m)
    state = dict(model_state(m))
    scales = [f for f in symmetries(m, x).factors if isinstance(f, RescalingFactor)]
    sens = {n: torch.rand(state[n].shape, generator=gen, dtype=torch.float64) for n in names}
    a = noise_model_scales(scales, state, names, sens, bits=4, per_channel=True, iters=50)
    b = noise_model_scales(scales, state, names, sens, bits=4, per_channel=True,
                           group_size=16, iters=50)  # fmt: skip
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    c = noise_model_scales(scales, state, names, sens, bits=4, per_channel=True,
                           group_size=2, iters=50)  # fmt: skip
    assert any(not torch.allclose(u, v) for u, v in zip(a, c))  # groups change the model
    assert QuantScheme.parse("w4g2").group_size == 2


def test_output_objective_rounds_a_tied_pair_as_one() -> None:
    """A GPT-2 language model holds its token embedding and its head as one tensor, and
    `quantize` rounds that tensor (the head's) for both uses. The output objective rounds
    it the same way: at the identity its score is the deployed model's output noise to
    rounding. (It used to fail inside `torch.func` with a raw `ValueError`, then was
    refused.) Negative: with the pair untied, so that the embedding stays in float, the
    noise differs. The equalized model keeps the tie and the function, and its rounded
    output noise is no higher than plain rounding's."""
    from tiny_hf import tiny_hf

    cfg = dict(vocab_size=24, n_embd=16, n_layer=1, n_head=2, n_positions=6, use_cache=False)
    m, x = tiny_hf("GPT2LMHeadModel", "GPT2Config", **cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    names, sch = quantized_params(m), QuantScheme.parse("w4")
    assert "lm_head.weight" in names and "transformer.wte.weight" not in names
    noise = _output_noise(m, x, names, sch)
    with torch.no_grad():
        y = m(**x).logits
        deployed = float(((quantize(m, sch)(**x).logits - y) ** 2).sum())
    assert noise(dict(model_state(m))) == pytest.approx(deployed, rel=1e-12)
    untied = copy.deepcopy(m)
    untied.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())
    with torch.no_grad():
        head_only = float(((quantize(untied, sch)(**x).logits - y) ** 2).sum())
    assert abs(head_only - deployed) > 1e-3 * deployed  # 1.4 %, against 1e-12 above
    eq = equalize(m, x, bits=4, objective="output", scheme=sch, search=20, learn=5)
    assert eq.lm_head.weight is eq.transformer.wte.weight
    assert invariance_error(m, eq, x) < 1e-9
    assert noise(dict(model_state(eq))) <= deployed * (1 + 1e-12)
    ranged = equalize(m, x, bits=4)  # the range objective keeps the tie as well
    assert ranged.lm_head.weight is ranged.transformer.wte.weight
