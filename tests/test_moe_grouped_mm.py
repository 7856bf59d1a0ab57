"""Mixtures of experts that `transformers` runs with `grouped_mm`, which has no float64
kernel: gaugenet's float64 measurements use a stand-in (`float64_kernels`).

Before, `symmetries` on a float32 `MixtralModel` or `Qwen3MoeModel` raised torch's raw
`RuntimeError` ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")
from its float64 self-check."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet._float64_kernels import float64_kernels, grouped_mm_reference
from gaugenet.apply import QuantScheme, equalize

transformers = pytest.importorskip("transformers")
grouped_mm = pytest.importorskip("torch.nn.functional").__dict__.get("grouped_mm")


@pytest.mark.skipif(grouped_mm is None, reason="this torch has no grouped_mm")
def test_grouped_mm_reference_is_grouped_mm():
    """The stand-in computes torch's `grouped_mm` (float32 kernel, to its rounding) on the
    rows that `offs` covers, with an empty group, and on 3D operands; the rows after
    `offs[-1]` are zero (torch leaves them undefined)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 8, generator=g)
    b = torch.randn(3, 8, 8, generator=g)
    offs = torch.tensor([3, 3, 8], dtype=torch.int32)
    ref = grouped_mm(a, b, offs=offs)
    got = grouped_mm_reference(a.double(), b.double(), offs)
    assert (got[:8] - ref[:8].double()).abs().max() < 1e-5
    assert torch.equal(got[8:], torch.zeros(2, 8, dtype=torch.float64))
    a3 = torch.randn(3, 4, 8, generator=g)
    assert (grouped_mm_reference(a3.double(), b.double()) - grouped_mm(a3, b)).abs().max() < 1e-5
    # negative: another partition of the rows gives another product
    other = grouped_mm_reference(a.double(), b.double(), torch.tensor([4, 4, 8]))
    assert (other[:8] - got[:8]).abs().max() > 1e-2
    with pytest.raises(NotImplementedError):
        grouped_mm_reference(a.double(), a.T.double(), offs)


@pytest.mark.skipif(grouped_mm is None, reason="this torch has no grouped_mm")
def test_float64_kernels_stand_in_only_for_float64():
    """Without the context float64 fails; inside it, float64 calls are the reference and
    float32 calls still go to torch."""
    a, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(2, 8, 8, dtype=torch.float64)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="Float32"):
        grouped_mm(a, b, offs=offs)
    with float64_kernels():
        y = grouped_mm(a, b, offs=offs)
        y32 = grouped_mm(a.float(), b.float(), offs=offs)
    assert torch.equal(y, grouped_mm_reference(a, b, offs))
    assert y32.dtype == torch.float32
    assert (y32.double() - y).abs().max() < 1e-5


def _moe(name: str, n: int = 12, **kw) -> tuple[torch.nn.Module, dict]:
    config = getattr(transformers, f"{name}Config")(
        vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}Model")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ids = torch.randint(0, 24, (n, 6), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


@pytest.mark.parametrize(
    "name, kw",
    [
        ("Mixtral", dict(num_local_experts=2, num_experts_per_tok=2)),
        (
            "Qwen3Moe",
            dict(num_experts=2, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=4),
        ),
    ],
)
def test_mixture_of_experts_is_discovered_certified_and_equalized(name, kw):
    model, inputs = _moe(name, **kw)
    group = gaugenet.symmetries(model, inputs)
    assert group.dim > 0
    assert not [b for b in group.breakers if "internal error" in str(b)]
    report = gaugenet.certify(model, inputs, group=group)
    assert report.verdict != "wrong", report
    assert report.worst_residual < 1e-12
    scheme = QuantScheme.parse("w4a8")
    moved = equalize(model, {"input_ids": inputs["input_ids"][:4]}, bits=4, objective="output",
                     scheme=scheme, group=group)  # fmt: skip
    with torch.no_grad():
        y = model(**inputs).last_hidden_state
        y2 = moved(**inputs).last_hidden_state
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5  # float32 model
    # negative: the equalized weights are not the input's
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), moved.parameters()))


def _experts_factor(group) -> gaugenet.groups.RescalingFactor:
    (f,) = [f for f in group.factors if f.name.startswith("experts:")]
    return f


@pytest.mark.parametrize(
    "name, kw, units",
    [
        ("Mixtral", dict(num_local_experts=2, num_experts_per_tok=2), 2 * 16),
        (
            "Qwen3Moe",
            dict(num_experts=2, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=4),
            2 * 8,
        ),
        (
            "Llama4Text",
            dict(num_local_experts=2, head_dim=4, interleave_moe_layer_step=1, use_cache=False),
            2 * 16,
        ),
    ],
)
def test_stacked_experts_hidden_units_rescale(name, kw, units):
    """Each expert's up column `j` times `α`, its down row `j` times `1/α`: one factor of
    dimension experts × hidden units, read off the graph for grouped (Mixtral, Qwen3-MoE)
    and batched (Llama 4) products alike. Its tangents lie in `ker J`, and certify's
    unexplained count drops by exactly its dimension (before: 48, 24 and 28)."""
    model, inputs = _moe(name, n=40, **kw)
    group = gaugenet.symmetries(model, inputs)
    f = _experts_factor(group)
    assert f.dim == units
    report = gaugenet.certify(model, inputs, group=group)
    assert report.tangent_residuals[f.name] < 1e-13
    without = gaugenet.GaugeGroup(
        tuple(g for g in group.factors if g is not f), group.breakers, group.param_names
    )
    assert gaugenet.certify(model, inputs, group=without).unexplained == (
        report.unexplained + units
    )
    # an element acts: up columns and down rows move, the outputs do not
    alpha = torch.exp(torch.randn(f.dim, generator=torch.Generator().manual_seed(2)))
    moved = group.act(model, {f.name: alpha})
    with torch.no_grad():
        y, y2 = model(**inputs).last_hidden_state, moved(**inputs).last_hidden_state
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5
    # negative: scaling the gate half instead changes the outputs (SiLU is not homogeneous)
    up, down = f.terms
    axis = next(d for d in (1, 2) if up.index.shape[d] > 1)
    gate = up.index.roll(up.index.shape[axis] // 2, dims=axis)
    wrong = gaugenet.groups.RescalingFactor("gate", f.n, terms=(type(up)(up.param, gate, 1), down))
    bad = group.act(model, {f.name: torch.ones(f.dim)})
    bad.load_state_dict(wrong.apply(gaugenet.groups.model_state(model), alpha), strict=False)
    with torch.no_grad():
        y3 = bad(**inputs).last_hidden_state
    assert float((y3 - y).abs().max() / y.abs().max()) > 1e-2


def test_a_float64_mixture_of_experts_is_certified():
    """A float64 Mixtral (as `gaugenet inspect --certify` loads a folder) does not run by
    itself on the CPU: every call certify makes of it, its cause finders' too, computes
    `grouped_mm` in float64 (before: torch's raw error, exit 1)."""
    model, inputs = _moe("Mixtral", n=40, num_local_experts=2, num_experts_per_tok=2)
    model = model.double()
    with pytest.raises(RuntimeError, match="Float32"), torch.no_grad():
        model(**inputs)
    report = gaugenet.certify(model, inputs)
    assert report.verdict == "incomplete" and report.exact, report  # the router's rows, ...
    assert report.worst_residual < 1e-13
