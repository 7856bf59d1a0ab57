"""Readers of a LayerNorm without a bias: the constant that the LayerNorm's kernel and shift
add to their outputs is harmless only on softmax keys, so such readers are kept exactly when
attention turns out to read them as keys (Whisper's bias-free key projection)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.groups import GaugeGroup


class _Block(nn.Module):
    """`o(attn(q(LN x), k(LN x), v(LN x)))` with 2 heads of 4; `k` has no bias, nor has `v`
    when `value_bias=False`."""

    def __init__(self, value_bias: bool, rotary: bool = False) -> None:
        super().__init__()
        self.rotary = rotary
        self.ln = nn.LayerNorm(8)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8, bias=False)
        self.v = nn.Linear(8, 8, bias=value_bias)
        self.o = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        b, t, _ = x.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, 2, 4).transpose(1, 2)

        def rotate(z: torch.Tensor) -> torch.Tensor:
            """Rotate each head's first plane by an angle growing with the position."""
            if not self.rotary:
                return z
            ang = 0.7 * torch.arange(t, dtype=z.dtype)[:, None]
            c, s = torch.cos(ang), torch.sin(ang)
            x0, x1 = z[..., 0:1], z[..., 1:2]
            return torch.cat([c * x0 - s * x1, s * x0 + c * x1, z[..., 2:]], -1)

        q, k = rotate(heads(self.q(h))), rotate(heads(self.k(h)))
        a = F.scaled_dot_product_attention(q, k, heads(self.v(h)))
        return self.o(a.transpose(1, 2).reshape(b, t, 8))


def _setup(value_bias: bool, rotary: bool = False):
    torch.manual_seed(0)
    model = _Block(value_bias, rotary).double().eval()
    with torch.no_grad():
        model.ln.weight.copy_(1 + 0.3 * torch.randn(8))
        model.ln.bias.copy_(0.5 * torch.randn(8))
    x = torch.randn(16, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x, gaugenet.symmetries(model, x)


def _err(model, group: GaugeGroup, x, factor) -> float:
    one = GaugeGroup((factor,), (), group.param_names)
    with keep_float64():
        moved = one.act(model, one.sample(torch.Generator().manual_seed(2)))
        return gaugenet.invariance_error(model, moved, x)


def test_bias_free_key_reader_is_kept() -> None:
    model, x, group = _setup(value_bias=True)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    kern = group.factor("ln_kernel:ln")
    assert {s.weight: s.bias for s in kern.kernel.slots} == {
        "q.weight": "q.bias",
        "k.weight": None,
        "v.weight": "v.bias",
    }
    assert kern.dim == 24 and not any(s.pending for s in kern.kernel.slots)
    shift = group.factor("shift:ln")
    assert shift.terms[0].pending == ()
    assert _err(model, group, x, kern) < 1e-12 and _err(model, group, x, shift) < 1e-12


def test_bias_free_key_reader_under_rotary_keeps_the_unrotated_rows() -> None:
    """Under a position-dependent rotation of the keys, a constant added to the projection's
    rotated key rows is no longer one constant on every key: only the unrotated rows (2, 3
    of each head) are kept (found on GPT-J from its config, where the self-check had to drop
    the whole key slot before the rows were cut)."""
    model, x, group = _setup(value_bias=True, rotary=True)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    kern = group.factor("ln_kernel:ln")
    slots = [(s.weight, s.start, s.stop, s.bias) for s in kern.kernel.slots]
    assert slots == [
        ("q.weight", 0, 8, "q.bias"),
        ("k.weight", 2, 4, None),
        ("k.weight", 6, 8, None),
        ("v.weight", 0, 8, "v.bias"),
    ]
    assert kern.dim == 20
    assert _err(model, group, x, kern) < 1e-12
    # negative: the rotated rows 0, 1 of head 0 do not keep the outputs
    k_slot = dataclasses.replace(kern.kernel.slots[1], start=0, stop=2)
    wrong = dataclasses.replace(
        kern, terms=(dataclasses.replace(kern.kernel, slots=(k_slot,)),), n=2
    )
    assert _err(model, group, x, wrong) > 1e-3
