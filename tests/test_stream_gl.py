"""The `GL(d)` of a residual stream that no normalization reads (`_stream_gl.py`).

An embedding, residual ReLU blocks and an untied head, with no LayerNorm: `h ↦ h G` for any
invertible `G` keeps the function (tables `E G`, writers `Gᵀ W`, readers `W G⁻ᵀ`). Before,
nothing found it, and certify put its 64 directions down to "layers fed by a table"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery._stream_gl import StreamGLFactor, TokenShiftFactor

F64 = torch.float64
D, V, T = 8, 12, 6


class _Stream(nn.Module):
    def __init__(self, blocks: int = 1, bias: bool = False, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, dtype=F64)
        self.pos = nn.Embedding(T, D, dtype=F64)
        self.up = nn.ModuleList(nn.Linear(D, 16, bias=bias, dtype=F64) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(16, D, bias=bias, dtype=F64) for _ in range(blocks))
        self.head = nn.Linear(D, V, bias=bias, dtype=F64)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        for up, down in zip(self.up, self.down):
            h = h + down(torch.relu(up(h)))
        return self.head(h)


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (64, T), generator=torch.Generator().manual_seed(1))


def _same_canonical(model, moved, ids, group) -> nn.Module:
    """The canonical forms of `model` and of `moved` (a point of its orbit) agree, entry by
    entry, to `1e-10` of the largest weight; returns `model`'s."""
    a = gaugenet.canonicalize(model, example_inputs=ids, group=group)
    b = gaugenet.canonicalize(moved, example_inputs=ids, group=group)
    top = max(float(p.abs().max()) for p in a.parameters())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert float((p - q).abs().max()) < 1e-10 * top, name
    return a


def _stream_gl(group) -> StreamGLFactor:
    (f,) = [f for f in group.factors if isinstance(f, StreamGLFactor)]
    return f


@pytest.mark.parametrize("blocks", [1, 2])
def test_stream_gl_found_exact_and_canonical(blocks):
    model, ids = _Stream(blocks), _ids()
    group = gaugenet.symmetries(model, ids)
    assert _stream_gl(group).dim == D * D
    g = group.sample(torch.Generator().manual_seed(2))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
    # the canonical form is the same from every point of the orbit
    a = _same_canonical(model, moved, ids, group)
    assert gaugenet.invariance_error(model, a, ids) < 1e-12


def test_one_block_is_complete():
    """`GL(8)`, the vector moved between the token and position tables (`R^8`) and the
    hidden units' rescalings: every redundancy of the Jacobian."""
    model, ids = _Stream(1), _ids()
    group = gaugenet.symmetries(model, ids)
    assert sorted(f.dim for f in group.factors if f.dim) == [D, 16, D * D]
    assert gaugenet.certify(model, ids).unexplained == 0


def test_biases_shift_with_the_readers_taking_it_back():
    """With biases: what each contributor writes (the two tables' rows, the writer's bias)
    shifts by `v`, the biased readers taking back what they see (3 × R^8); every redundancy
    of the Jacobian is found, and the canonical form is one per orbit."""
    model, ids = _Stream(1, bias=True), _ids()
    group = gaugenet.symmetries(model, ids)
    shifts = [f for f in group.factors if isinstance(f, TokenShiftFactor)]
    assert sorted(f.name for f in shifts) == [
        "token_shift:down.0.bias",
        "token_shift:emb.weight",
        "token_shift:pos.weight",
    ]
    assert gaugenet.certify(model, ids).unexplained == 0
    g = group.sample(torch.Generator().manual_seed(5))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
    _same_canonical(model, moved, ids, group)
    # negative: the shift of the writer's bias without the head taking it back
    f = next(f for f in shifts if f.name.endswith("down.0.bias"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moved_state = f.apply(state, torch.ones(D, dtype=F64))
    moved_state["head.bias"] = state["head.bias"]
    bad = _Stream(1, bias=True)
    bad.load_state_dict(moved_state)
    assert gaugenet.invariance_error(model, bad, ids) > 1e-3


def test_not_a_symmetry_without_the_readers_taking_it_back():
    """Negative: the tables and writers turned by `G` with the readers left alone."""
    model, ids = _Stream(1), _ids()
    group = gaugenet.symmetries(model, ids)
    f = _stream_gl(group)
    G = torch.eye(D, dtype=F64) + 0.3 * torch.randn(
        D, D, generator=torch.Generator().manual_seed(3), dtype=F64
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moved = f.apply(state, G[None])
    for name in ("up.0.weight", "head.weight"):
        moved[name] = state[name]
    bad = _Stream(1)
    bad.load_state_dict(moved)
    assert gaugenet.invariance_error(model, bad, ids) > 1e-3


def test_tied_head_gets_no_stream_gl():
    """The table is read as the head too: `E ↦ E G` and `E ↦ E G⁻ᵀ` disagree."""
    model, ids = _Stream(1, tied=True), _ids()
    group = gaugenet.symmetries(model, ids)
    assert not any(isinstance(f, StreamGLFactor) for f in group.factors)
    g = group.sample(torch.Generator().manual_seed(4))
    assert gaugenet.invariance_error(model, group.act(model, g), ids) < 1e-12


class _NoNormTransformer(nn.Module):
    """One softmax attention block and one ReLU block on a stream with no normalization."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(V, D, dtype=F64), nn.Embedding(T, D, dtype=F64)
        self.qkv = nn.Linear(D, 3 * D, bias=bias, dtype=F64)
        self.o = nn.Linear(D, D, bias=bias, dtype=F64)
        self.up = nn.Linear(D, 16, bias=bias, dtype=F64)
        self.down = nn.Linear(16, D, bias=bias, dtype=F64)
        self.head = nn.Linear(D, V, bias=bias, dtype=F64)

    def forward(self, ids):
        B, n = ids.shape
        h = self.emb(ids) + self.pos(torch.arange(n))
        q, k, v = (t.reshape(B, n, 2, -1).transpose(1, 2) for t in self.qkv(h).split(D, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
        h = h + self.o((a @ v).transpose(1, 2).reshape(B, n, D))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_on_a_stream_with_no_normalization(bias):
    """The stream's `GL`, its shifts (the key entries of the readers' biases left to the
    softmax), the attention's `GL`s and the rescalings: complete, and one canonical form
    per orbit (the stream's `GL` fixed before the head forms that read its readers)."""
    model, ids = _NoNormTransformer(bias), _ids()
    group = gaugenet.symmetries(model, ids)
    assert any(isinstance(f, StreamGLFactor) for f in group.factors)
    assert gaugenet.certify(model, ids).unexplained == 0
    moved = group.act(model, group.sample(torch.Generator().manual_seed(6)))
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
    _same_canonical(model, moved, ids, group)


class _RawPositions(nn.Module):
    """Positions as a parameter added as it is (`(T, d)`), or sliced to the length
    (`(1, T + 2, d)[:, :n]`, the slice bound traced from `ids.shape[1]`), and MLP weights on
    raw parameters."""

    def __init__(self, sliced: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sliced = sliced
        self.emb = nn.Embedding(V, D, dtype=F64)
        shape = (1, T + 2, D) if sliced else (T, D)
        self.pos = nn.Parameter(torch.randn(*shape, dtype=F64))
        self.up = nn.Parameter(torch.randn(16, D, dtype=F64) / 3)
        self.down = nn.Parameter(torch.randn(D, 16, dtype=F64) / 4)
        self.head = nn.Linear(D, V, dtype=F64)

    def forward(self, ids):
        n = ids.shape[1]
        h = self.emb(ids) + (self.pos[:, :n] if self.sliced else self.pos)
        h = h + torch.relu(h @ self.up.T) @ self.down.T
        return self.head(h)


@pytest.mark.parametrize("sliced", [False, True])
def test_positions_as_a_raw_parameter(sliced):
    model, ids = _RawPositions(sliced), _ids()
    group = gaugenet.symmetries(model, ids)
    assert sorted(f.name for f in group.factors if f.dim) == [
        "scale:up",
        "stream_gl:emb",
        "token_shift:pos",
    ]
    moved = group.act(model, group.sample(torch.Generator().manual_seed(7)))
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
    # unsliced: complete; sliced: the two position rows no slice reads are left (16)
    assert gaugenet.certify(model, ids).unexplained == (2 * D if sliced else 0)
