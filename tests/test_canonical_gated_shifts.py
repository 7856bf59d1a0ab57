"""`canonicalize` on groups with monomial scales and key shifts found through a gain.

A squared-ReLU MLP (Nemotron's `lin2(relu(lin1 x)²)`) carries a monomial scale, whose
canonical element is fixed after the shifts' gauges, and a shift that it rescales: the
shift's element in the group's order (scales first) needs that scale too, which was not
there yet (`KeyError`). Persimmon's key bias shift found through its key LayerNorm's gain
(`_attention_gain.gain_key_shift`) names its entries by flat index; its canonical form, a
zero key bias on those entries, could not read them (`TypeError`). Both now come out
canonical: the function kept to float64 rounding, the gauge conditions met exactly, and a
moved copy of the model reaches the same monomial scales and key-bias entries."""

from __future__ import annotations

import torch

import gaugenet
from gaugenet.attention._factors import KeyShiftFactor
from gaugenet.groups._monomial import MonomialScaleFactor
from test_overridden_norm_subclass import _nemotron
from test_qk_layernorm_kernel import _persimmon


def _moved(model, group, factor, seed: int = 3):
    """`model` moved by a random element of one factor of `group`."""
    gen = torch.Generator().manual_seed(seed)
    elem = {f.name: f.identity(torch.float64) for f in group.factors}
    elem[factor.name] = factor.sample(gen, scale=0.5)
    return group.act(model, elem)


def test_nemotron_monomial_scale_and_shift():
    model, ids = _nemotron()
    group = gaugenet.symmetries(model, ids)
    (mono,) = [f for f in group.factors if isinstance(f, MonomialScaleFactor)]
    canon = gaugenet.canonicalize(model, example_inputs=ids, group=group)
    assert gaugenet.exact_invariance_error(model, canon, ids) < 1e-9
    # the monomial's gauge (balanced in and out norms of each hidden unit): a copy moved
    # by the monomial scales reaches the same MLP weights
    other = gaugenet.canonicalize(_moved(model, group, mono), example_inputs=ids, group=group)
    for name in ("layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"):
        a, b = canon.get_parameter(name), other.get_parameter(name)
        assert float((a - b).detach().abs().max() / b.detach().abs().max()) < 1e-8, name
    # negative: the model itself is not in that gauge
    w = model.get_parameter("layers.0.mlp.up_proj.weight")
    assert (
        float((w - canon.get_parameter("layers.0.mlp.up_proj.weight")).detach().abs().max()) > 1e-3
    )


def test_persimmon_gain_key_shift_zeroes_its_entries():
    model, ids = _persimmon()
    group = gaugenet.symmetries(model, ids)
    shifts = [f for f in group.factors if isinstance(f, KeyShiftFactor) and f.terms[0].param]
    flat = [f for f in shifts if hasattr(f.terms[0], "index")]
    assert flat, "Persimmon's key shift through its key LayerNorm gain"
    canon = gaugenet.canonicalize(model, example_inputs=ids, group=group)
    assert gaugenet.exact_invariance_error(model, canon, ids) < 1e-9
    sd, before = dict(canon.named_parameters()), dict(model.named_parameters())
    for f in flat:
        t = f.terms[0]
        assert float(t.entries(before).abs().max()) > 1e-3  # not zero to begin with
        assert float(t.entries(sd).abs().max()) < 1e-12
