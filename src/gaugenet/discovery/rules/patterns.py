"""Pattern rules: symmetries of a shape of the graph rather than of one operation. Their
code runs where `Rule.where` says (from the LayerNorm rule, the Linear rule, or after
propagation); the registry holds them so that their examples are tested like every rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._centering import centered_output
from .._concat_gl import concat_gls
from .._embeddings import embedding_sum_factors
from .._free_entries import with_free
from .._kernel import kernel_factor
from .._linear_streams import linear_streams
from .._norm_rules import NormRules
from .._offset import layernorm_offset
from .._shifts import layernorm_shift
from .._stream import stream_rotations
from .._summed_biases import summed_bias_factors
from ._examples import batch, seeded, token_ids
from ._rule import Example, Rule
from .linear import consecutive_linear

__all__ = ["RULES"]


def _where(f: Any, when: str) -> str:
    return f"`{f.__module__}.{f.__qualname__}`, {when}"


# -- examples ---------------------------------------------------------------------------------
def _bottleneck() -> tuple[nn.Module, Any]:
    return seeded(lambda: nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4))), batch(64, 4)


def _ln_reader() -> tuple[nn.Module, Any]:
    return seeded(lambda: nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3))), batch(64, 4)


def _ln_bias_free_reader() -> tuple[nn.Module, Any]:
    model = seeded(lambda: nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3, bias=False)))
    with torch.no_grad():  # `Σ β/γ ≠ 0` (at `β = 0` the offset's orbit degenerates)
        model[0].weight.copy_(torch.tensor([1.2, 0.7, 1.5, 0.9]))
        model[0].bias.copy_(torch.tensor([0.5, -0.2, 0.3, 0.1]))
    return model, batch(64, 4)


def _ln_after_linear() -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    )
    return model, batch(64, 3)


class _Embeddings(nn.Module):
    """Word and position tables summed, then a LayerNorm and a ReLU reader."""

    def __init__(self) -> None:
        super().__init__()
        self.word, self.pos = nn.Embedding(6, 4), nn.Embedding(5, 4)
        self.ln, self.out = nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1])
        return self.out(torch.relu(self.ln(self.word(ids) + self.pos(pos))))


class _Stream(nn.Module):
    """An embedding, one residual MLP write, RMS normalizations written out, a linear head.
    The shape check makes `torch.fx` fail, so it is captured by `torch.export`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 4)
        self.g1, self.g2 = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.rand(4) + 0.5)
        self.up, self.down = nn.Linear(4, 5, bias=False), nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 8, bias=False)

    @staticmethod
    def _rms(x: Tensor, g: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    def forward(self, ids: Tensor) -> Tensor:
        if ids.ndim != 2:
            raise ValueError("expects (batch, tokens)")
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(self._rms(x, self.g1))))
        return self.head(self._rms(x, self.g2))


class _DeadBranch(nn.Module):
    """A ReLU MLP beside a layer whose result nothing reads and a parameter nothing uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 5)
        self.extra = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        _ = self.unused(h)
        return self.b(torch.relu(h))


class _Positions(nn.Module):
    """Word and position tables summed into a LayerNorm, the positions looked up at a
    buffer of position ids: 5 of the table's 8 rows are read, whatever the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.word, self.pos = nn.Embedding(6, 4), nn.Embedding(8, 4)
        self.ln, self.out = nn.LayerNorm(4), nn.Linear(4, 2)
        self.register_buffer("positions", torch.arange(5), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.relu(self.ln(self.word(ids) + self.pos(self.positions))))


def _random_bn(*bns: nn.Module) -> None:
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.3, 0.3)


class _Shortcut(nn.Module):
    """A residual block of linear layers with a projection shortcut: `Linear, ReLU, Linear`
    summed with a linear projection of the input, then a ReLU and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1 = nn.Linear(3, 4), nn.Linear(4, 3)
        self.proj, self.head = nn.Linear(3, 3), nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(torch.relu(self.l0(x)))
        return self.head(torch.relu(h + self.proj(x)))


class _Bottleneck(nn.Module):
    """A linear residual stream: a stem convolution with BatchNorm (no activation) writes it,
    one inverted residual block reads it (1×1 expansion, BatchNorm, ReLU) and writes back
    (1×1 projection, BatchNorm, no activation), a 1×1 head with a bias reads the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.expand, self.bn_e = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.project, self.bn1 = nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 4, 1)
        _random_bn(self.bn0, self.bn_e, self.bn1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.bn0(self.stem(x))
        s = s + self.bn1(self.project(torch.relu(self.bn_e(self.expand(s)))))
        return self.head(s)


class _UpConcat(nn.Module):
    """A U-Net level: a convolution and ReLU, max-pooled, a transposed convolution back up,
    concatenated with the skip, then a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.dec = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.enc(x))
        u = self.up(torch.nn.functional.max_pool2d(a, 2))
        return self.dec(torch.cat([u, a], 1))


RULES = (
    Rule(
        "consecutive linear maps",
        "patterns",
        None,
        (
            Example(
                _bottleneck,
                6,
                "B(A x) through 2 units with both biases: the affine group GA(2), 4 + 2",
            ),
        ),
        where=_where(consecutive_linear, "from the Linear rule"),
    ),
    Rule(
        "layernorm shift",
        "patterns",
        None,
        (
            Example(
                _ln_reader,
                11,
                "γ, β scaled per feature against the reader's columns (4), β moved into the "
                "reader's bias (4), the kernel 1/γ in the reader's 3 rows (3)",
            ),
        ),
        where=_where(layernorm_shift, f"from `{NormRules.__qualname__}.layernorm_shift`"),
    ),
    Rule(
        "layernorm kernel",
        "patterns",
        None,
        (Example(_ln_reader, 11, "as for the LayerNorm shift: 4 + 4 + 3"),),
        where=_where(kernel_factor, f"from `{NormRules.__qualname__}.layernorm_kernel`"),
    ),
    Rule(
        "layernorm offset",
        "patterns",
        None,
        (
            Example(
                _ln_bias_free_reader,
                8,
                "γ, β scaled per feature against the reader's columns (4), the offsets "
                "I + c 1ᵀ turning the bias-free reader's rows while β/γ moves by their inverse (4)",
            ),
        ),
        where=_where(layernorm_offset, "from the LayerNorm rule"),
    ),
    Rule(
        "centering",
        "patterns",
        None,
        (
            Example(
                _ln_after_linear,
                8,
                "the first layer's output along 1 is removed by the LayerNorm: W += 1 aᵀ (3) "
                "and b += t 1 (1); γ, β scaled per feature through ReLU (4)",
            ),
        ),
        where=_where(centered_output, f"from `{NormRules.__qualname__}.centered_inputs`"),
    ),
    Rule(
        "embedding sums",
        "patterns",
        None,
        (
            Example(
                lambda: (seeded(_Embeddings), token_ids(6, 8, 5)),
                18,
                "each row of both tables along 1 (6 + 5), a vector ⟂ 1 moved between the "
                "tables (3), γ and β scaled per feature through ReLU (4)",
            ),
        ),
        where=_where(embedding_sum_factors, f"from `{NormRules.__qualname__}.embedding_sum`"),
    ),
    Rule(
        "unread entries",
        "patterns",
        None,
        (
            Example(
                lambda: (seeded(_DeadBranch), batch(64, 3)),
                32,
                "one scale per ReLU unit (4); the 28 entries no output reads move freely: "
                "`extra` (3) and the dead layer's weight and bias (20 + 5), whose own "
                "rescalings are among those moves",
            ),
            Example(
                lambda: (seeded(_Positions), token_ids(6, 8, 5)),
                30,
                "the 3 position rows no position id selects move freely (12); the read rows "
                "along 1 (6 + 5), a vector ⟂ 1 moved between the tables (3), γ and β scaled "
                "per feature through ReLU (4)",
            ),
        ),
        where=_where(with_free, "after the factors are built"),
    ),
    Rule(
        "summed biases",
        "patterns",
        None,
        (
            Example(
                # seed 1: under seed 0 a hidden unit's weights leave part of `l1` unread
                lambda: (seeded(_Shortcut, seed=1), batch(256, 3)),
                10,
                "one scale per unit of the first ReLU (4) and of the second (3), the biases "
                "moved between the two summed branches (3)",
            ),
        ),
        where=_where(summed_bias_factors, "after the factors are built"),
    ),
    Rule(
        "linear residual streams",
        "patterns",
        None,
        (
            Example(
                lambda: (seeded(_Bottleneck), batch(24, 2, 5, 5)),
                29,
                "GL(3) of the stream (9), each BatchNorm writer's shift taken back by the "
                "readers it reaches (3 + 3), the rows of the three 1×1-or-stem convolutions "
                "against their BatchNorms (3 + 4 + 3), one scale per ReLU unit (4)",
            ),
        ),
        where=_where(linear_streams, "between propagation and building the factors"),
    ),
    Rule(
        "concatenated linear maps",
        "patterns",
        None,
        (
            Example(
                lambda: (seeded(_UpConcat), batch(16, 1, 8, 8)),
                6,
                "one scale per ReLU unit (2), GL(2) between the transposed convolution and "
                "the convolution reading its slice of the concatenation (4)",
            ),
        ),
        where=_where(concat_gls, "between propagation and building the factors"),
    ),
    Rule(
        "residual-stream rotations",
        "patterns",
        None,
        (
            Example(
                lambda: (seeded(_Stream), token_ids(40, 16, 5)),
                19,
                "the stream rotated by O(4) (6), one scale per MLP unit (5), γ₁ and γ₂ scaled "
                "per feature against their readers' columns (4 + 4); the last RMS "
                "normalization also hides one direction of each table row, and the Jacobian "
                "has no clear gap: its rank is not compared",
                jacobian=False,
            ),
        ),
        where=_where(stream_rotations, "after propagation"),
    ),
)
