"""A position-bias table read only by softmax scores moves freely by one constant per head."""

from __future__ import annotations

import torch
from torch import nn

import gaugenet

F64 = torch.float64


class RelBias(nn.Module):
    """Two-head softmax attention with a learned bias per (head, relative distance); with
    `leak`, the bias table also feeds the output (then no shift is free)."""

    def __init__(self, d: int = 4, t: int = 5, heads: int = 2, leak: bool = False) -> None:
        super().__init__()
        self.h, self.leak = heads, leak
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.rel = nn.Embedding(2 * t - 1, heads)
        idx = torch.arange(t)[None, :] - torch.arange(t)[:, None] + t - 1
        self.register_buffer("idx", idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda z: z.reshape(b, t, self.h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        bias = self.rel(self.idx).permute(2, 0, 1).unsqueeze(0)  # (1, heads, t, t)
        p = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        y = self.o((p @ v).transpose(1, 2).reshape(b, t, d))
        return y + bias.mean() if self.leak else y


def _model(leak: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(30, 5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    return RelBias(leak=leak).to(F64), x


def _shift(group):
    return [f for f in group.factors if f.name.startswith("scoreshift:")]


def test_relative_bias_shift_per_head() -> None:
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    (f,) = _shift(group)
    assert f.dim == 2 and f.params() == ("rel.weight",)
    moved = group.act(model, {f.name: torch.tensor([3.0, -2.0], dtype=F64)})
    assert torch.allclose(moved.rel.weight - model.rel.weight, torch.tensor([3.0, -2.0], dtype=F64))
    assert gaugenet.invariance_error(model, moved, x) < 1e-13
    assert gaugenet.certify(model, x, group=group).unexplained == 0
    # negative: one constant per distance (a row) instead of per head changes the outputs
    wrong = RelBias().to(F64)
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong.rel.weight[:, 0] += torch.linspace(-1, 1, 9, dtype=F64)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2
    # canonical form: every column of zero mean
    canon = gaugenet.canonicalize(model, group=group)
    assert torch.allclose(canon.rel.weight.mean(0), torch.zeros(2, dtype=F64), atol=1e-12)


def test_a_table_read_elsewhere_gets_no_shift() -> None:
    model, x = _model(leak=True)
    assert not _shift(gaugenet.symmetries(model, x))


def test_t5_relative_attention_bias() -> None:
    """T5's relative bias (computed in the first layer, reused by the others, masked with
    `where`, passed to scaled_dot_product_attention as its mask): one shift per head."""
    import transformers

    cfg = transformers.T5Config(
        vocab_size=24, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).to(F64).eval()
    ids = torch.randint(0, 24, (20, 6), generator=torch.Generator().manual_seed(2))
    group = gaugenet.symmetries(model, {"input_ids": ids})
    (f,) = _shift(group)
    assert f.dim == 2
    g = {f.name: torch.tensor([1.5, -0.5], dtype=F64)}
    assert gaugenet.invariance_error(model, group.act(model, g), {"input_ids": ids}) < 1e-12
