"""A residual stream read through LayerNorms rotates by `O(d − 1)`: the rotations that keep
`1`, with each LayerNorm's `γ` conjugated into its readers and `β` moved with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet._errors import GaugeError
from gaugenet.groups import OrthogonalFactor
from gaugenet.nets import PreLN

F64 = torch.float64


def _model(**kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = PreLN(**kw).to(F64)
    with torch.no_grad():  # LayerNorm gains and shifts away from their initial 1 and 0
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.normal_()
    ids = torch.randint(0, 10, (60, 5), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.mark.parametrize("kw", [{}, {"ln_bias": False}, {"bias": False}], ids=str)
def test_layernorm_stream_rotation_is_found_and_complete(kw) -> None:
    model, ids = _model(**kw)
    group = gaugenet.symmetries(model, ids)
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    assert rot.fixes_ones and rot.dim == 5 * 4 // 2
    report = gaugenet.certify(model, ids, group=group)
    assert report.verdict != "wrong" and report.worst_residual < 1e-12  # tangents in ker J
    if kw.get("ln_bias") is False:
        # without shifts every direction of ker J is explained; with them, 7 and 42 others
        # stay (table-fed first layer, LayerNorm-shift interplay), not the rotation's
        assert report.verdict == "complete", report
    # without the rotation, exactly its dimension more of ker J is unexplained
    rest = tuple(f for f in group.factors if f is not rot)
    without = gaugenet.GaugeGroup(rest, group.breakers, group.param_names)
    assert gaugenet.certify(model, ids, group=without).unexplained == report.unexplained + rot.dim
    g = group.sample(torch.Generator().manual_seed(2))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
    assert not torch.allclose(moved.tok.weight, model.tok.weight)
    # group laws with the shifts declared as moved by the rotation
    back = group.act(moved, group.inverse(g))
    for a, b in zip(back.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-11)
    h = group.sample(torch.Generator().manual_seed(3))
    both = group.act(moved, h)
    composed = group.act(model, group.compose(g, h))
    for a, b in zip(both.parameters(), composed.parameters()):
        assert torch.allclose(a, b, atol=1e-11)


def test_a_rotation_that_moves_ones_changes_the_outputs() -> None:
    """A rotation of all of `R^d` (it moves `1`) acting through the same terms: the
    LayerNorms' mean subtraction sees it, and the element is refused as invalid."""
    model, ids = _model()
    group = gaugenet.symmetries(model, ids)
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=F64))
    with pytest.raises(GaugeError, match="all-ones"):
        rot.validate(q)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = dict(state)
    for t in rot.terms:
        t(new, q)
    wrong = PreLN().to(F64)
    wrong.load_state_dict(new)
    assert gaugenet.invariance_error(model, wrong, ids) > 1e-2
