"""GPT-J (partial rotary, projections without biases after a LayerNorm): the LayerNorm
kernel `W[i] += a_i / γ` adds the constant `a_i Σ β/γ` to key row `i` at every token. On an
unrotated key coordinate that is one constant on every key, which softmax removes; on a
rotated one the rotation turns it with the position. The kernel is offered on exactly the
unrotated key rows, moves with the query-key commutant's unrotated block and with the head
permutations."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64

V, T = 32, 6
KEY = "h.0.attn.k_proj.weight"
KERNEL = "ln_kernel:h.0.ln_1"


def _gptj() -> tuple[torch.nn.Module, dict]:
    import transformers

    cfg = transformers.GPTJConfig(
        vocab_size=V, n_embd=8, n_layer=1, n_head=2, rotary_dim=2, n_positions=T, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPTJModel(cfg).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # norms away from their special values
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ids = torch.randint(0, V, (16, T), generator=gen)
    return model, {"input_ids": ids}


@pytest.fixture(scope="module")
def gptj():
    model, ids = _gptj()
    return model, ids, gaugenet.symmetries(model, ids)


def _kernel(group):
    (f,) = [f for f in group.factors if f.name == KERNEL]
    return f


def test_kernel_holds_the_unrotated_key_rows(gptj) -> None:
    model, ids, group = gptj
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    slots = _kernel(group).kernel.slots
    # head_dim 4 with rotary_dim 2: coordinates 2, 3 of each of the 2 key heads; the
    # query and value projections have no bias and do not feed softmax keys: no rows
    keys = sorted((s.start, s.stop) for s in slots if s.weight == KEY)
    assert keys == [(2, 4), (6, 8)]
    assert not [s for s in slots if "q_proj" in s.weight or "v_proj" in s.weight]
    f = _kernel(group)
    a = torch.zeros(f.dim, dtype=torch.float64)
    k = sum(s.size for s in slots[: [s.weight for s in slots].index(KEY)])
    a[k : k + 4] = torch.tensor([1.5, -2.0, 0.7, 3.0])
    with keep_float64():
        moved = group.act(model, {f.name: a})
        assert gaugenet.invariance_error(model, moved, ids) < 1e-10
    # negative: the same move on the rotated key rows 0, 1 of head 0 changes the outputs
    ln = model.h[0].ln_1
    u = 1 / ln.weight.detach()
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.get_parameter(KEY)[:2] += torch.tensor([1.5, -2.0], dtype=torch.float64)[:, None] * u
    assert gaugenet.invariance_error(model, wrong, ids) > 1e-3


def test_kernel_composes_with_the_commutant_and_permutations(gptj) -> None:
    """Random elements of the whole group (query-key commutant, head permutations,
    kernel): acting twice equals acting by the composition, the inverse undoes it; without
    its declared query-key move the kernel composes wrongly. The LayerNorm's offset group
    (bias-free q, v and the rotated key rows turn; the unrotated key rows are left to the
    kernel) is part of the element."""
    model, ids, group = gptj
    assert group.factor("ln_offset:h.0.ln_1").dim == 8
    gen = torch.Generator().manual_seed(3)
    g, h = group.sample(gen, scale=0.4), group.sample(gen, scale=0.4)
    with keep_float64():
        twice = group.act(group.act(model, g), h)
        once = group.act(model, group.compose(g, h))
        back = group.act(group.act(model, g), group.inverse(g))
        assert gaugenet.invariance_error(model, once, ids) < 1e-10
    with torch.no_grad():
        for name, q, r in zip(group.param_names, twice.parameters(), once.parameters()):
            assert float((q - r).abs().max()) < 1e-10 * (1 + float(q.abs().max())), name
        for p, q in zip(model.parameters(), back.parameters()):
            assert float((p - q).abs().max()) < 1e-10 * (1 + float(p.abs().max()))
    f = _kernel(group)
    assert any(len(m) == 5 for m in f.moved_by)  # the unrotated block of the commutant
    plain = gaugenet.GaugeGroup(
        tuple(dataclasses.replace(x, moved_by=()) if x is f else x for x in group.factors),
        group.breakers,
        group.param_names,
    )
    wrong = plain.act(model, plain.compose(g, h))
    with torch.no_grad():
        assert float((wrong.get_parameter(KEY) - twice.get_parameter(KEY)).abs().max()) > 1e-3


def test_heads_swapped_carry_the_kernel(gptj) -> None:
    model, ids, group = gptj
    perms = [
        p
        for p in group.of_kind("permutation")
        if KERNEL in dict(p.conjugates) and any(t.param == KEY for t in p.terms)
    ]
    assert perms, "no head permutation carries the kernel's entries"
    p = perms[0]
    assert dict(p.conjugates)[KERNEL].shape == (2, 2)  # 2 heads, 2 unrotated rows each
    gen = torch.Generator().manual_seed(5)
    g = group.sample(gen, scale=0.3)
    swap = {**group.identity(), p.name: torch.tensor([1, 0])}
    with keep_float64():
        twice = group.act(group.act(model, g), swap)
        once = group.act(model, group.compose(g, swap))
        assert gaugenet.invariance_error(model, once, ids) < 1e-10
    with torch.no_grad():
        for name, q, r in zip(group.param_names, twice.parameters(), once.parameters()):
            assert float((q - r).abs().max()) < 1e-10 * (1 + float(q.abs().max())), name
