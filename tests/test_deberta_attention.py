"""DeBERTa-v2's attention, found from its graph.

- It divides the transposed keys by `√(d_head · f)` before the product: a number on every
  score, so the core is the usual one (before: no core at all, 113 directions unexplained).
- It multiplies the embeddings' LayerNorm output by the attention mask, `ones` built in the
  graph when none is given: the LayerNorm's readers are read through it.
- With relative attention, the scores add `q · k_r` and `k · q_r`, where `k_r`, `q_r` are the
  relative-position table projected by the same key and query maps. The query-key `GL` then
  turns the key bias too, and a constant on the keys is no symmetry (the `p2c` term sees it).
- The query and key projections also read that table: the embeddings' LayerNorm kernel is
  kept in the value rows alone.
"""

from __future__ import annotations

import copy
import math

import torch

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.certify import Verdict
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery.rules._examples import DEBERTA_TINY, DEBERTA_V3_ATTENTION
from gaugenet.groups import GaugeGroup, model_state
from tiny_hf import tiny_hf

_LAYER = "encoder.layer.0.attention"


def _deberta(relative: bool):
    relative_attention = DEBERTA_V3_ATTENTION if relative else {}
    return tiny_hf("DebertaV2Model", "DebertaV2Config", **DEBERTA_TINY, **relative_attention)


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)[0]


def _factors(model, x):
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    return group, {f.name: f for f in group.factors}


def _moved(group, model, factor, seed: int = 0):
    return group.act(model, {factor.name: factor.sample(torch.Generator().manual_seed(seed))})


def test_scaled_keys_are_a_core_and_the_layer_is_explained() -> None:
    model, x = _deberta(relative=False)
    group, names = _factors(model, x)
    qk, vo = names[f"{_LAYER}.qk"], names[f"{_LAYER}.vo"]
    assert qk.dim == vo.dim == 2 * 4 * 4
    assert f"{_LAYER}.key_shift" in names  # plain softmax scores: a constant per query
    assert "ln_kernel:embeddings.LayerNorm" in names  # read through `· ones`
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-12
    # one direction is left under the rank tolerance (`‖J t‖ ≈ 2e-10 σ_max`): the
    # embeddings' LayerNorm output scaled, the query and key maps taking it back, which
    # holds up to the next LayerNorm's `eps = 1e-7`; certify constructs it as that cause
    # (the norm's `eps` is not under the rank tolerance times its inputs' variance, but
    # what the outputs see of it is)
    assert report.verdict is Verdict.INCOMPLETE and report.unexplained == 1
    assert any(
        c.startswith("1 directions scaling input rows of a LayerNorm") for c in report.causes
    )
    ref = _out(model, x)
    for f in (qk, vo, names["ln_kernel:embeddings.LayerNorm"]):
        assert relative_error(_out(_moved(group, model, f), x), ref) < 1e-12


def test_the_query_map_alone_changes_the_scaled_scores() -> None:
    """Negative: the query rows moved, the key rows left as they were."""
    model, x = _deberta(relative=False)
    group, names = _factors(model, x)
    moved = _moved(group, model, names[f"{_LAYER}.qk"])
    with torch.no_grad():
        moved.encoder.layer[0].attention.self.key_proj.weight.copy_(
            model.encoder.layer[0].attention.self.key_proj.weight
        )
    assert relative_error(_out(moved, x), _out(model, x)) > 1e-3


def test_relative_attention_turns_the_key_bias_and_has_no_key_shift() -> None:
    model, x = _deberta(relative=True)
    group, names = _factors(model, x)
    qk = names[f"{_LAYER}.qk"]
    assert qk.dim == 2 * 4 * 4
    key_bias = f"{_LAYER}.self.key_proj.bias"
    assert key_bias in {t.param for t in qk.terms}
    assert f"{_LAYER}.key_shift" not in names
    kernel = names["ln_kernel:embeddings.LayerNorm"]  # value rows only
    assert {s.weight for s in kernel.kernel.slots} == {f"{_LAYER}.self.value_proj.weight"}
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-12
    ref = _out(model, x)
    for f in (qk, names[f"{_LAYER}.vo"], kernel):
        assert relative_error(_out(_moved(group, model, f), x), ref) < 1e-12


def test_relative_scores_see_a_key_shift_and_an_unturned_key_bias() -> None:
    """Negatives: a constant added to every key moves the `p2c` term by a different amount
    for each key; the query-key element with the key bias left alone changes the scores;
    the embeddings' kernel in the query rows moves the projected position table too."""
    model, x = _deberta(relative=True)
    group, names = _factors(model, x)
    ref = _out(model, x)
    att = model.encoder.layer[0].attention.self

    shifted = _deberta(relative=True)[0]
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        shifted.encoder.layer[0].attention.self.key_proj.bias.add_(1.0)
    assert relative_error(_out(shifted, x), ref) > 1e-3

    moved = _moved(group, model, names[f"{_LAYER}.qk"])
    with torch.no_grad():
        moved.encoder.layer[0].attention.self.key_proj.bias.copy_(att.key_proj.bias)
    assert relative_error(_out(moved, x), ref) > 1e-3

    ln = model.embeddings.LayerNorm
    in_queries = _deberta(relative=True)[0]
    in_queries.load_state_dict(model.state_dict())
    with torch.no_grad():
        u = 1 / ln.weight
        a = torch.linspace(0.5, 1.5, 8, dtype=u.dtype)
        q = in_queries.encoder.layer[0].attention.self.query_proj
        q.weight.add_(a[:, None] * u[None, :])
        q.bias.sub_(a * (ln.bias * u).sum())
    assert relative_error(_out(in_queries, x), ref) > 1e-3


class _ScaledKeys(torch.nn.Module):
    """Attention whose transposed keys are divided by a number: `√d_head` read off the
    queries' shape, or (`by_norm`) the keys' own norm, which the query-key `GL` changes."""

    def __init__(self, by_norm: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q, self.k, self.v, self.o = (
            torch.nn.Linear(6, 6, dtype=torch.float64) for _ in range(4)
        )
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / 2)
        self.by_norm = by_norm

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (2, 3)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        c = k.norm() if self.by_norm else math.sqrt(q.size(-1))
        a = torch.softmax(torch.matmul(q, k.transpose(-1, -2) / c), dim=-1) @ v
        return self.o(a.transpose(1, 2).flatten(-2))


def test_keys_divided_by_a_number_from_the_shapes() -> None:
    model = _ScaledKeys()
    x = torch.randn(32, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    group, names = _factors(model, x)
    assert {"q.qk", "q.vo", "q.key_shift"} <= set(names)
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    assert (
        relative_error(_out_plain(group.act(model, group.sample()), x), _out_plain(model, x))
        < 1e-12
    )


def test_keys_divided_by_their_own_norm_are_not_a_plain_core() -> None:
    """Negative: the divisor is computed from the keys' values, so it is not looked through
    (the query-key `GL` changes `‖k‖`): no query-key factor, and the element that would be
    one changes the outputs."""
    model = _ScaledKeys(by_norm=True)
    x = torch.randn(32, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    group, names = _factors(model, x)
    assert "q.qk" not in names
    _, plain = _factors(_ScaledKeys(), x)
    qk = plain["q.qk"]
    moved = copy.deepcopy(model)  # the plain model's element, applied to the norm-scaled one
    moved.load_state_dict(qk.apply(model_state(model), qk.sample(torch.Generator().manual_seed(0))))
    assert relative_error(_out_plain(moved, x), _out_plain(model, x)) > 1e-3


def _out_plain(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


class _MaskedNorm(torch.nn.Module):
    """A LayerNorm whose output is multiplied by a per-token mask before a linear reader:
    `ones` built in the forward (as DeBERTa without a mask), or the mask given as input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = torch.nn.LayerNorm(6, dtype=torch.float64)
        self.fc = torch.nn.Linear(6, 4, dtype=torch.float64)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.normal_()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = torch.ones(x.shape[:-1], dtype=x.dtype) if mask is None else mask
        return self.fc(self.ln(x) * m.unsqueeze(-1))


def test_a_norm_is_read_through_constant_ones_but_not_through_a_mask() -> None:
    """`· ones` passes the LayerNorm's output on: the kernel in `fc`'s rows is found and
    keeps the outputs. A mask given as input is not looked through (at a masked token `fc`'s
    bias alone would be seen, and the kernel's bias change would show): no kernel, and the
    kernel's element changes the outputs where the mask is 0 (negative)."""
    model = _MaskedNorm()
    x = torch.randn(16, 5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    group, names = _factors(model, x)
    kernel = names["ln_kernel:ln"]
    assert kernel.dim == 4
    moved = group.act(model, {kernel.name: torch.linspace(0.5, 2.0, 4, dtype=torch.float64)})
    assert relative_error(_out_plain(moved, x), _out_plain(model, x)) < 1e-13

    mask = (torch.arange(5) < 3).to(torch.float64).expand(16, 5)
    with torch.no_grad():
        masked = gaugenet.symmetries(model, (x, mask))
        assert "ln_kernel:ln" not in {f.name for f in masked.factors}
        state = kernel.apply(model_state(model), torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
        other = copy.deepcopy(model)
        other.load_state_dict(state)
        assert relative_error(other(x, mask), model(x, mask)) > 1e-3


def test_relative_attention_has_one_canonical_form_per_orbit() -> None:
    """Canonical forms from two points of one orbit agree; with the query-key factor left
    out of the group, two points related by a query-key element do not (negative)."""
    model, x = _deberta(relative=True)
    group, names = _factors(model, x)
    qk = names[f"{_LAYER}.qk"]
    other = _moved(group, model, qk, seed=3)
    a = gaugenet.canonicalize(model, example_inputs=x, group=group)
    b = gaugenet.canonicalize(other, example_inputs=x, group=gaugenet.symmetries(other, x))
    assert relative_error(_out(a, x), _out(model, x)) < 1e-12

    def gap(m1, m2) -> float:
        return max(float((p - q).abs().max()) for p, q in zip(m1.parameters(), m2.parameters()))

    assert gap(a, b) < 1e-10
    without = GaugeGroup(
        tuple(f for f in group.factors if f.name != qk.name), group.breakers, group.param_names
    )
    a2 = gaugenet.canonicalize(model, example_inputs=x, group=without)
    b2 = gaugenet.canonicalize(other, example_inputs=x, group=without)
    assert gap(a2, b2) > 1e-3
