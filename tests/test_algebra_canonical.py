"""The canonical form of subalgebra factors: rotary query-key elements (a scaling-rotation per
plane, `GL` on an unrotated part) and grouped-query value-output elements reach one
representative from every point of their orbit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery._float64 import keep_float64
from gaugenet.groups import AlgebraFactor, GaugeGroup
from gaugenet.groups._algebra_canonical import _sides, algebra_blocks, canonical_algebra_element

V, T = 24, 6


def _llama(cls: str = "LlamaModel", config: str = "LlamaConfig", **extra) -> tuple[nn.Module, dict]:
    import transformers

    cfg = dict(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=T,
        use_cache=False,
    )
    cfg.update(extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**cfg)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / p.shape[1] ** 0.5)
    ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def _algebra(group: GaugeGroup) -> GaugeGroup:
    fs = tuple(f for f in group.factors if isinstance(f, AlgebraFactor))
    return GaugeGroup(fs, (), group.param_names)


@pytest.mark.parametrize(
    "extra",
    [
        {},  # rotary on every dimension: a scaling-rotation per plane
        {"cls": "GPTNeoXModel", "config": "GPTNeoXConfig", "rotary_pct": 0.5},  # partial
    ],
    ids=["llama-gqa", "neox-partial"],
)
def test_subalgebra_canonical_form_is_orbit_independent(extra) -> None:
    model, inputs = _llama(**extra)
    group = gaugenet.symmetries(model, inputs)
    alg = _algebra(group)
    assert alg.factors, "no subalgebra factor found"
    kinds = {k for f in alg.factors for k, _ in algebra_blocks(f.basis, f.d)}
    assert "other" not in kinds
    state = {k: v.detach().double() for k, v in model.state_dict().items()}
    moved = alg.act(model, alg.sample(torch.Generator().manual_seed(3)))
    mstate = {k: v.detach().double() for k, v in moved.state_dict().items()}
    for f in alg.factors:
        a, b = canonical_algebra_element(f, state), canonical_algebra_element(f, mstate)
        f.validate(a)  # inside the algebra, invertible
        ca, cb = f.apply(dict(state), a), f.apply(dict(mstate), b)
        # the blocks this factor acts on (a packed projection also holds other factors' rows)
        for sa, sb in zip(_sides(f, ca)[:2], _sides(f, cb)[:2]):
            for k in range(f.b):
                assert torch.allclose(sa[k], sb[k], atol=1e-9, rtol=1e-9), (f.name, k)
        # idempotent: the canonical state is its own canonical form
        again = canonical_algebra_element(f, ca)
        assert torch.allclose(again, f.identity(), atol=1e-9)
    with keep_float64():
        c1 = gaugenet.canonicalize(model, group=group)
        c2 = gaugenet.canonicalize(moved, group=group)
        assert gaugenet.invariance_error(model, c1, inputs) < 1e-10
    s1, s2 = c1.state_dict(), c2.state_dict()
    assert max(float((s1[k] - s2[k]).abs().max()) for k in s1) < 1e-8


def test_off_algebra_change_is_not_undone() -> None:
    """The negative: a full GL element on a rotary head (outside the algebra) changes the
    function, and the canonical form of the changed weights differs from the original's."""
    model, inputs = _llama()
    group = gaugenet.symmetries(model, inputs)
    qk = next(f for f in _algebra(group).factors if f.basis is not None)
    full = AlgebraFactor("full", qk.d, qk.b, terms=qk.terms)
    bad = GaugeGroup((full,), (), group.param_names)
    moved = bad.act(model, bad.sample(torch.Generator().manual_seed(5)))
    with keep_float64():
        assert gaugenet.invariance_error(model, moved, inputs) > 1e-3
    state = {k: v.detach().double() for k, v in model.state_dict().items()}
    mstate = {k: v.detach().double() for k, v in moved.state_dict().items()}
    ca = qk.apply(dict(state), canonical_algebra_element(qk, state))
    cb = qk.apply(dict(mstate), canonical_algebra_element(qk, mstate))
    xa, xb = _sides(qk, ca)[0], _sides(qk, cb)[0]
    assert max(float((a - b).abs().max()) for a, b in zip(xa, xb)) > 1e-3
