"""An attention whose queries or keys the analysis cannot trace (here: L2-normalized without
a gain, as Llama 4's) still has its value-output GL: the softmax weights do not read the
values. Discovery keeps that part and names the query-key part among the breakers.
Invariance in float64, the count against `n − rank J` (the normalized queries and keys
have only a rotation per head of their own, which discovery does not offer), and a GL on
the value rows without its inverse on the output columns as the negative."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery.rules._examples import batch, seeded
from tiny_hf import DECODER, tiny_hf

F64 = torch.float64


class L2Attention(nn.Module):
    """8 features, 2 heads of 4; queries and keys divided by their norm (with `eps`)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def _heads(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, 2, 4).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q = F.normalize(self._heads(self.q(x)), dim=-1, eps=1e-6)
        k = F.normalize(self._heads(self.k(x)), dim=-1, eps=1e-6)
        a = torch.softmax(q @ k.transpose(-2, -1) * 3, dim=-1) @ self._heads(self.v(x))
        return self.o(a.transpose(1, 2).reshape(x.shape))


def test_value_output_gl_without_the_query_key_part() -> None:
    model, x = seeded(L2Attention), batch(48, 5, 8)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert any(b.reason.startswith("query-key part of the attention") for b in group.breakers)
    vo = next(f for f in group.factors if f.name.endswith(".vo"))
    assert vo.dim == 32  # GL(4) per head
    shift = next(f for f in group.factors if f.name.endswith("value_shift"))
    assert shift.dim == 8
    assert not any(f.name.endswith(".qk") for f in group.factors)
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-12
    # what is left, not offered: per head, a rotation of the query and key rows together
    # (O(4), 6) and a scale of each (`F.normalize` divides by `max(‖q‖, eps)`: 2)
    assert report.n_params - report.functional_dimension == group.dim + 16
    ref, gen = model(x), torch.Generator().manual_seed(0)
    for _ in range(3):
        assert relative_error(group.act(model, group.sample(gen))(x), ref) < 1e-12


def test_value_rows_turned_alone_change_the_outputs() -> None:
    model, x = seeded(L2Attention), batch(48, 5, 8)
    g = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64) + 2 * torch.eye(4)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.v.weight[:4] = g.T @ model.v.weight[:4]
        moved.v.bias[:4] = g.T @ model.v.bias[:4]
    assert relative_error(moved(x), model(x)) > 1e-3
    with torch.no_grad():  # with the output columns taken back, the same element holds
        moved.o.weight[:, :4] = model.o.weight[:, :4] @ torch.linalg.inv(g.T)
    assert relative_error(moved(x), model(x)) < 1e-12


def test_multi_head_latent_attention_keeps_its_value_output_gl() -> None:
    """`DeepseekV3Model` (multi-head latent attention): keys joined from two projections
    (not traced), values read from `kv_b_proj`, whose output has an axis of one entry
    beside batch and tokens; the value-output GL(4) per head is found and holds."""
    model, x = tiny_hf(
        "DeepseekV3Model",
        "DeepseekV3Config",
        **DECODER,
        kv_lora_rank=4,
        q_lora_rank=4,
        qk_rope_head_dim=2,
        qk_nope_head_dim=2,
        v_head_dim=4,
        n_routed_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=8,
        first_k_dense_replace=1,
    )
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    vo = next(f for f in group.factors if f.name.endswith(".vo"))
    assert vo.dim == 32
    assert "layers.0.self_attn.kv_b_proj.weight" in vo.params()
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-10
    with torch.no_grad(), keep_float64():  # its norms compute in float32 otherwise
        ref = model(**x)[0]
        moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))(**x)[0]
    assert relative_error(moved, ref) < 1e-12
