"""`exact_invariance_error`: float32 rounding inside a float64 model is not a drift.

GPT-Neo computes its attention scores in float32 whatever its dtype, so every element of
its query-key `GL` moves the float64 model's outputs by about `1e-7`, above the `1e-9` that
`canonicalize` allows in float64: its canonical form was refused. With the casts down kept
in float64 the same element moves them by rounding only, while an element that is not a
symmetry still moves them by its own amount, and a model that computes something else in
float64 (a cast that is part of its function) is measured as it is."""

from __future__ import annotations

import torch
from torch import nn

import gaugenet
from gaugenet._invariance import SAME_FUNCTION, relative_error
from tiny_hf import unit_gain

T = 6


class _Float32Scores(nn.Module):
    """`softmax(x W_q (x W_k)ᵀ)` with the scores taken in float32, then `· x W_v`."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.q(x).float() @ self.k(x).float().transpose(-1, -2)
        return torch.softmax(s, -1).to(x.dtype) @ self.v(x)


class _Rounds(nn.Module):
    """A model whose float16 cast is part of what it computes (`x` rounded to half)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(1000.0 * x).half().to(x.dtype)


def _moved_qk(model: _Float32Scores, g: torch.Tensor) -> _Float32Scores:
    """`W_q ↦ G W_q`, `b_q ↦ G b_q`, `W_k ↦ G⁻ᵀ W_k`, `b_k ↦ G⁻ᵀ b_k`: scores unchanged."""
    new = _Float32Scores().double()
    new.load_state_dict(model.state_dict())
    with torch.no_grad():
        new.q.weight.copy_(g @ model.q.weight)
        new.q.bias.copy_(g @ model.q.bias)
        gi = torch.linalg.inv(g).T
        new.k.weight.copy_(gi @ model.k.weight)
        new.k.bias.copy_(gi @ model.k.bias)
    return new


def test_float32_scores_are_not_a_drift_but_a_break_is():
    torch.manual_seed(0)
    model = _Float32Scores().double()
    x = torch.randn(3, T, 4, dtype=torch.float64)
    g = torch.eye(4, dtype=torch.float64) + 0.5 * torch.randn(4, 4, dtype=torch.float64)
    moved = _moved_qk(model, g)
    plain = gaugenet.invariance_error(model, moved, x)
    exact = gaugenet.exact_invariance_error(model, moved, x)
    assert plain > 1e-9  # the float32 scores' rounding, seen in float64
    assert exact < 1e-13
    # negative: the key left unmoved is no symmetry, and is measured as one
    broken = _moved_qk(model, g)
    with torch.no_grad():
        broken.k.load_state_dict(model.k.state_dict())
    assert gaugenet.exact_invariance_error(model, broken, x) > 1e-2


def test_a_cast_that_is_part_of_the_function_is_kept():
    torch.manual_seed(1)
    model = _Rounds().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        other = _Rounds().double()
        other.load_state_dict(model.state_dict())
        other.lin.bias.add_(1e-3)  # below half's step at these magnitudes: often the same
    # half's rounding is what this model computes: in float64 it would move by far more
    # than SAME_FUNCTION, so the models run as they are and agree as they do there
    from gaugenet.discovery._float64 import keep_float64

    with torch.no_grad(), keep_float64():
        wide = model(x)
    assert relative_error(wide, model(x).detach()) > SAME_FUNCTION
    assert gaugenet.exact_invariance_error(model, other, x) == gaugenet.invariance_error(
        model, other, x
    )


def test_gpt_neo_canonical_form_in_float64():
    import transformers

    cfg = transformers.GPTNeoConfig(
        vocab_size=32,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        max_position_embeddings=T,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = unit_gain(
        transformers.GPTNeoModel(cfg).double().eval(), torch.Generator().manual_seed(0), bias=0.1
    )
    ids = {"input_ids": torch.randint(0, 32, (4, T), generator=torch.Generator().manual_seed(1))}
    group = gaugenet.symmetries(model, ids)
    assert any(f.kind == "gl" for f in group.factors)
    canon = gaugenet.canonicalize(model, example_inputs=ids, group=group)
    assert gaugenet.exact_invariance_error(model, canon, ids) < 1e-9
    assert gaugenet.invariance_error(model, canon, ids) > 1e-9  # float32 scores, as they are
    moved = sum(
        float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), canon.parameters())
    )
    assert moved > 1e-3  # the canonical form is another point of the orbit
