"""GPT-2's layout from the computation: `addmm` linear maps with `(in, out)` weights read by
LayerNorm kernels and shifts, outputs along `1` that only LayerNorms read, and embedding
tables in a residual stream that only LayerNorms read."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.certify import functional_dimension
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.groups import GaugeGroup

V, T = 24, 6


class _Hidden(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).last_hidden_state


@pytest.fixture(scope="module")
def gpt2() -> tuple[nn.Module, dict, GaugeGroup]:
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=T, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # unit gain, so that the Jacobian's rank is clear
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, dtype=p.dtype) / p.shape[0] ** 0.5)
    ids = torch.randint(0, V, (40, T), generator=torch.Generator().manual_seed(0))
    ids[0] = torch.arange(T)
    inputs = {"input_ids": ids}
    return model, inputs, gaugenet.symmetries(model, inputs)


def _one(group: GaugeGroup, prefix: str) -> GaugeGroup:
    f = next(f for f in group.factors if f.name.startswith(prefix))
    return GaugeGroup((f,), (), group.param_names)


def _error(model: nn.Module, group: GaugeGroup, inputs: dict, seed: int = 1) -> float:
    with keep_float64():
        moved = group.act(model, group.sample(torch.Generator().manual_seed(seed)))
        return gaugenet.invariance_error(model, moved, inputs)


def test_gpt2_group_is_complete(gpt2) -> None:
    """Every redundancy the Jacobian shows is a discovered symmetry, and each new factor kind
    is exact on its own."""
    model, inputs, group = gpt2
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    with keep_float64():
        fd = functional_dimension(_Hidden(model), (inputs["input_ids"],))
    assert group.dim == fd.n_params - fd.rank == 247
    for prefix in ("ln_kernel:h.0.ln_1", "shift:h.0.ln_1", "center:h.0.mlp", "center:wte"):
        assert _error(model, _one(group, prefix), inputs) < 1e-12, prefix
    assert _error(model, group, inputs) < 1e-12


def test_packed_key_rows_keep_query_and_value_compensation(gpt2) -> None:
    """The kernel of ln_1 in the packed query-key-value weight leaves only the key entries
    of the bias alone; dropping the compensation of the query and value entries too (one
    slot for the whole packed bias) changes the outputs."""
    model, inputs, group = gpt2
    kern = next(f for f in group.factors if f.name == "ln_kernel:h.0.ln_1")
    slots = kern.kernel.slots
    assert [(s.start, s.stop, s.bias is None) for s in slots] == [
        (0, 8, False),
        (8, 16, True),
        (16, 24, False),
    ]
    assert all(s.out_axis == 1 for s in slots)
    whole = dataclasses.replace(slots[0], stop=24, bias=None)
    wrong = dataclasses.replace(kern, terms=(dataclasses.replace(kern.kernel, slots=(whole,)),))
    assert _error(model, GaugeGroup((wrong,), (), group.param_names), inputs) > 1e-3


def test_token_rows_move_only_along_ones(gpt2) -> None:
    """Rows of the token table move along `1` only: the same change along another direction
    changes the outputs; and a tied head that reads the table takes those factors away."""
    model, inputs, group = gpt2
    rows = _one(group, "center:wte")
    c = torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with keep_float64():
        moved = rows.act(model, {rows.factors[0].name: c})
        assert gaugenet.invariance_error(model, moved, inputs) < 1e-12
        bad = type(model)(model.config).double().eval()
        bad.load_state_dict(model.state_dict())
        with torch.no_grad():
            skew = torch.linspace(-1, 1, 8, dtype=torch.float64)
            bad.wte.weight += c[:, None] * skew[None, :]
        assert gaugenet.invariance_error(model, bad, inputs) > 1e-3
