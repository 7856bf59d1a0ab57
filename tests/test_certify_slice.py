"""`certify(..., params=S)`: the certificate of a slice of the parameters (the other entries
frozen), against the whole model's exact picture on small float64 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._slice import _forward, _reverse, slice_entries
from gaugenet.groups import GaugeGroup


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return m.double(), x


def _unit(unit: int = 1, bias: bool = True) -> dict[str, torch.Tensor]:
    """The support of hidden unit `unit`'s rescaling: its row, bias and outgoing column."""
    row = torch.zeros(5, 3, dtype=torch.bool)
    row[unit] = True
    col = torch.zeros(4, 5, dtype=torch.bool)
    col[:, unit] = True
    out = {"0.weight": row, "2.weight": col}
    if bias:
        out["0.bias"] = torch.tensor([unit])
    return out


def _inside(t: torch.Tensor, cols: torch.Tensor) -> int:
    """`dim(span T ∩ ℝ^S) = rank T − rank T_{S^c}` from the dense tangents."""
    rest = torch.ones(t.shape[1], dtype=torch.bool)
    rest[cols] = False
    rank = torch.linalg.matrix_rank
    return int(rank(t)) - int(rank(t[:, rest])) if t.numel() else 0


def test_unit_support_and_partial_slice_match_the_whole_model() -> None:
    m, x = _mlp()
    group = gaugenet.symmetries(m, x)
    full = gaugenet.certify(m, x, group=group, method="exact")
    assert full.verdict == "complete" and full.symmetry_dim == 5
    one = gaugenet.certify(m, x, group=group, params=_unit())
    assert (one.verdict, one.n_params, one.symmetry_dim, one.unexplained) == ("complete", 8, 1, 0)
    assert (one.slice.measured, one.slice.discovered, one.slice.discovered_upper) == (1, 1, 1)
    assert one.slice.factors == ("scale:0",) and one.worst_residual < 1e-12
    # without the bias the unit's orbit does not fit: nothing inside, nothing measured
    part = gaugenet.certify(m, x, group=group, params=_unit(bias=False))
    assert (part.verdict, part.slice.measured, part.slice.discovered) == ("complete", 0, 0)


def test_whole_model_as_a_slice_equals_the_exact_certificate() -> None:
    m, x = _mlp()
    group = gaugenet.symmetries(m, x)
    full = gaugenet.certify(m, x, group=group, method="exact")
    every = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in m.named_parameters()}
    r = gaugenet.certify(m, x, group=group, params=every)
    assert r.n_params == full.n_params == 54
    assert r.functional_dimension == full.functional_dimension == 49
    assert r.symmetry_dim == r.slice.discovered_upper == 5


class _Block(nn.Module):
    """A post-norm transformer block: attention, LayerNorms, a ReLU FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("which", ["biases", "first_ffn_unit", "norms", "key_bias"])
def test_slices_of_a_transformer_block_match_dense_counts(which: str) -> None:
    torch.manual_seed(0)
    m = _Block().double().eval()
    x = torch.randn(24, 5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    group = gaugenet.symmetries(m, x)
    p = dict(m.named_parameters())
    if which == "biases":
        params = {n: torch.ones(v.shape, dtype=torch.bool) for n, v in p.items() if "bias" in n}
    elif which == "key_bias":  # every entry redundant: J_S is at rounding level
        params = {"layer.self_attn.in_proj_bias": torch.arange(4, 8)}
    elif which == "norms":
        params = {n: torch.ones(v.shape, dtype=torch.bool) for n, v in p.items() if "norm" in n}
    else:
        row = torch.zeros(6, 4, dtype=torch.bool)
        row[0] = True
        col = torch.zeros(4, 6, dtype=torch.bool)
        col[:, 0] = True
        params = {
            "layer.linear1.weight": row,
            "layer.linear1.bias": torch.tensor([0]),
            "layer.linear2.weight": col,
        }
    r = gaugenet.certify(m, x, group=group, params=params)
    fm = flat_model(m, x)
    cols = slice_entries(fm, params).columns
    jac = jacobian_of(fm)
    # zero below 1e-9 of ‖J‖ (not of ‖J_S‖, which a redundant slice has at rounding level)
    tol = 1e-9 * float(torch.linalg.matrix_norm(jac, ord=2))
    measured = len(cols) - int(torch.linalg.matrix_rank(jac[:, cols], atol=tol, rtol=0.0))
    inside = _inside(group.tangent(fm.model), cols)
    # the lower bound is the count; the upper one may be loose where other tangents share
    # the rows' entries outside the slice
    assert (r.slice.measured, r.slice.discovered) == (measured, inside)
    assert r.slice.discovered_upper >= inside
    assert r.verdict == ("complete" if measured == inside else "incomplete")
    if which == "key_bias":
        assert measured == inside == 4
    if which == "first_ffn_unit":  # the unit's scale, its row along 1 (the LayerNorm's
        assert inside == 3  # kernel) and its outgoing column along 1 (the next LayerNorm's)


def test_a_dropped_factor_shows_as_a_gap_on_its_slice() -> None:
    m, x = _mlp()
    group = gaugenet.symmetries(m, x)
    without = GaugeGroup(
        tuple(f for f in group.factors if f.kind != "rescaling"), (), group.param_names
    )
    r = gaugenet.certify(m, x, group=without, params=_unit())
    assert (r.verdict, r.slice.measured, r.slice.discovered, r.unexplained) == (
        "incomplete",
        1,
        0,
        1,
    )
    assert r.causes and "unexplained" in r.causes[0] and "0.weight" in r.causes[0]
    # a slice off the missing orbit's support stays complete: the gap is local
    assert gaugenet.certify(m, x, group=without, params=_unit(bias=False)).verdict == "complete"


def test_unread_entries_are_named() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 4)).double()
    ids = torch.arange(6).repeat(4)  # rows 6-9 are never read
    group = GaugeGroup((), (), tuple(n for n, _ in m.named_parameters()))
    r = gaugenet.certify(m, ids, group=group, params={"0.weight": torch.arange(30)})
    assert (r.verdict, r.slice.measured, r.unexplained) == ("incomplete", 12, 12)
    assert "no effect on these inputs: 0.weight (12)" in r.causes[0]


def test_forward_and_reverse_slice_jacobians_agree() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(12, 4)).double()
    x = torch.randn(9, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fm = flat_model(m, x)
    sl = slice_entries(fm, {"0.weight": torch.arange(0, 54, 5), "1.weight": torch.arange(3)})
    rev = _reverse(fm, sl)
    assert rev is not None
    assert torch.allclose(rev, _forward(fm, sl), atol=1e-12)
    assert torch.allclose(rev, jacobian_of(fm)[:, sl.columns], atol=1e-12)


def test_bad_slices_raise() -> None:
    m, x = _mlp()
    group = gaugenet.symmetries(m, x)

    def bad(params: object, match: str, **kw: object) -> None:
        with pytest.raises(GaugeError, match=match):
            gaugenet.certify(m, x, group=group, params=params, **kw)

    bad({"nope.weight": torch.tensor([0])}, "names no parameter")
    bad({"0.weight": torch.ones(3, 5, dtype=torch.bool)}, "mask has shape")
    bad({"0.weight": torch.tensor([15])}, r"flat indices must lie in \[0, 15\)")
    bad({"0.weight": torch.tensor([0.5])}, "boolean mask or integer")
    bad({"0.weight": [0, 1]}, "boolean mask or an integer index tensor")
    bad({"0.weight": torch.zeros(5, 3, dtype=torch.bool)}, "slice is empty")
    bad(["0.weight"], "must map parameter names")
    bad(_unit(), "certified exactly", method="matrix-free")
    with pytest.raises(GaugeError, match="not more than the 8 entries"):
        gaugenet.certify(m, x[:3], group=group, params=_unit())
