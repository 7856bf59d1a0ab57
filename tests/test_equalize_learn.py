"""Learning the element on the group's manifold: orthogonal factors through their own `exp`,
against the rounded output error with a straight-through estimator."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet import GaugeError
from gaugenet.apply import QuantScheme, logit_kl, next_token_loss, squared_error
from gaugenet.apply._equalize import _hadamard, _output_noise, equalizing_element
from gaugenet.apply._learn import learn_element, straight_through
from gaugenet.apply._quantize import quantized_params
from gaugenet.apply._schemes import round_weight
from gaugenet.groups import model_state
from loud_llama import loud_llama

SCHEME = QuantScheme.parse("w4t")
# Llama's RMSNorm takes its statistic in float32 whatever the weights' dtype, so any rotation
# of the stream (the Hadamard too) moves this float64 model's outputs at float32 round-off.
KEPT = 1e-6


@pytest.fixture(scope="module")
def llama():
    """A one-layer Llama causal LM (float64) with one loud residual feature, its inputs,
    its discovered group and the residual stream's orthogonal factor."""
    return loud_llama()


def _start(model):
    return {k: v.double() if v.is_floating_point() else v for k, v in model_state(model).items()}


def _learn(llama, steps=40):
    model, x, group, rot = llama
    base = {rot.name: _hadamard(rot.d)}
    names = quantized_params(model)
    elem, loss = learn_element(
        group, model, x, _start(model), base, [rot], names, SCHEME, steps=steps
    )
    return base, elem, loss


def test_learned_rotation_is_in_the_group_and_keeps_the_function(llama) -> None:
    model, x, group, rot = llama
    _, elem, _ = _learn(llama)
    q = elem[rot.name]
    assert (q.T @ q - torch.eye(rot.d, dtype=torch.float64)).abs().max() < 1e-12
    group.validate(elem)
    assert gaugenet.invariance_error(model, group.act(model, elem), x) < KEPT


def test_learning_lowers_the_rounded_output_error_from_the_hadamard_start(llama) -> None:
    model, x, group, rot = llama
    base, elem, loss = _learn(llama)
    noise = _output_noise(model, x, quantized_params(model), SCHEME)
    before = noise(group.act_state(_start(model), base, validate=False))
    after = noise(group.act_state(_start(model), elem, validate=False))
    assert abs(after - loss) <= 1e-9 * after  # the reported loss is the realized objective
    assert after < 0.99 * before


def test_learning_is_deterministic(llama) -> None:
    (_, a, _), (_, b, _) = _learn(llama, steps=5), _learn(llama, steps=5)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_orthogonal_update_changes_the_function(llama) -> None:
    """Negative control: the same step off the manifold (`Q + εA`, `A` skew, not `Q exp(εA)`)
    is refused by the factor and changes what the model computes."""
    model, x, group, rot = llama
    a = torch.randn(rot.d, rot.d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    off = _hadamard(rot.d) + 0.05 * (a - a.T)
    with pytest.raises(GaugeError, match="not orthogonal"):
        rot.validate(off)
    moved = group.act_state(_start(model), {rot.name: off}, validate=False)
    new = group.act(model, {rot.name: _hadamard(rot.d)})
    new.load_state_dict({k: v for k, v in moved.items() if k in new.state_dict()})
    assert gaugenet.invariance_error(model, new, x) > 1e-3


@pytest.mark.slow
def test_equalize_with_learning_never_worse_and_guarded(llama, monkeypatch) -> None:
    model, x, group, rot = llama
    bad = group.act(model, {rot.name: _hadamard(rot.d)})  # a badly rotated start
    noise = _output_noise(bad, x, quantized_params(bad), SCHEME)
    kw = dict(bits=4, objective="output", scheme=SCHEME, group=group, search=0, sweeps=2)
    _, plain = equalizing_element(bad, x, **kw)
    _, learned = equalizing_element(bad, x, learn=30, **kw)
    e_plain = noise(group.act_state(_start(bad), plain, validate=False))
    e_learned = noise(group.act_state(_start(bad), learned, validate=False))
    assert e_learned <= e_plain * (1 + 1e-12) and e_learned <= noise(_start(bad))
    eq = gaugenet.apply.equalize(bad, x, learn=30, tol=KEPT, **kw)
    assert gaugenet.invariance_error(bad, eq, x) < KEPT

    # the guard: a learner that returns a worse element is not followed
    def worse(group, model, inputs, start, base, *args, **kwargs):
        g = torch.Generator().manual_seed(3)
        return {**base, rot.name: rot.compose(base[rot.name], rot.sample(g))}, 0.0

    monkeypatch.setattr("gaugenet.apply._equalize.learn_element", worse)
    _, guarded = equalizing_element(bad, x, learn=30, **kw)
    assert all(torch.equal(guarded[k], plain[k]) for k in plain)


def test_learning_needs_the_output_objective(llama) -> None:
    model, x, group, _ = llama
    with pytest.raises(GaugeError, match="objective='output'"):
        equalizing_element(model, x, bits=4, group=group, learn=5)


def test_straight_through_rounds_forward_and_passes_the_gradient() -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w.requires_grad_(True)
    q = straight_through(w, SCHEME)
    assert torch.equal(q.detach(), round_weight(w.detach(), SCHEME))
    (q * torch.arange(24.0, dtype=torch.float64).reshape(4, 6)).sum().backward()
    assert torch.equal(w.grad, torch.arange(24.0, dtype=torch.float64).reshape(4, 6))


def test_output_distances() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    yq = y + 0.1 * torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    assert float(logit_kl(y, y)) == 0.0 and float(logit_kl(y + 2.0, y)) < 1e-12  # shift-blind
    p, lq = y.softmax(-1), yq.log_softmax(-1)
    expected = (p * (y.log_softmax(-1) - lq)).sum()
    assert abs(float(logit_kl(yq, y) - expected)) < 1e-12 and float(expected) > 0
    assert float(squared_error(yq, y)) == float(((yq - y) ** 2).sum())


def test_next_token_loss_reads_the_shifted_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    lp = logits.log_softmax(-1)
    expected = -sum(float(lp[b, t, ids[b, t + 1]]) for b in range(2) for t in range(4))
    loss = next_token_loss(ids)
    assert abs(float(loss(logits, torch.zeros_like(logits))) - expected) < 1e-12
    # negative: the unshifted tokens give another value
    assert abs(float(next_token_loss(ids[:, :-1])(logits[:, 1:], logits)) - expected) > 1e-3
