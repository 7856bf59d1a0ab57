"""A zoo of small architectures on which discovery is certified (tests and claims).

Each entry builds a float64 model in eval mode and a batch of inputs whose outputs outnumber
the parameters (so the Jacobian's rank can show every redundancy). `known` says whether all
of the model's continuous symmetries are known to discovery (then `certify` must give
`unexplained == 0`); `breakers` lists words that must appear among the named breakers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets import example_gcn

__all__ = ["ZOO", "Entry"]


@dataclass(frozen=True)
class Entry:
    """One architecture: `build()` gives the float64 eval-mode model, `inputs(generator)` a
    batch large enough for the Jacobian's rank."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Tensor]
    known: bool = True
    breakers: tuple[str, ...] = field(default=())
    #: the symmetry dimension derived by hand
    dim: int | None = None


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Zero-mean weights of unit gain and small biases: every ReLU unit is active on part
    of a standard normal batch and inactive on the rest (no dead or always-active units)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.double().eval()


def _seq(*layers: nn.Module, seed: int = 0) -> nn.Module:
    return _init(nn.Sequential(*layers), seed)


def _mlp(widths: tuple[int, ...], act: Callable[[], nn.Module], seed: int = 0) -> Callable:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(act())
        return _init(nn.Sequential(*layers), seed)

    return build


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64))
                m.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
    return model.eval()


class ResBlock(nn.Module):
    """`relu(x + bn(conv(relu(bn(conv(x))))))` with biased convolutions before BatchNorm."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.block = ResBlock(3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(torch.flatten(self.pool(h), 1))


class ConcatCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 2, 1)
        self.mix = nn.Conv2d(5, 3, 1)
        self.ra, self.rb, self.rm = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.ra(self.a(x)), self.rb(self.b(x))], dim=1)
        h = F.adaptive_avg_pool2d(self.rm(self.mix(h)), 1)
        return self.head(h.flatten(1))


class LowRank(nn.Module):
    """`W = U V` with rank 2, then a ReLU layer."""

    def __init__(self) -> None:
        super().__init__()
        self.v, self.u = nn.Linear(5, 2, bias=False), nn.Linear(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.u(self.v(x))))


class Tied(nn.Module):
    """Two layers sharing one weight matrix `W`.

    Tying breaks the per-unit rescalings of both layers but leaves one joint rescaling,
    which discovery solves from the tie: `W ↦ cW`, `b1 ↦ c b1`, `b2 ↦ c² b2`,
    `out.weight ↦ out.weight / c²` (`c > 0`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.l2.weight = self.l1.weight
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.r2(self.l2(self.r1(self.l1(x)))))


class Block(nn.Module):
    """A transformer encoder block with `nn.MultiheadAttention` and a ReLU feed-forward."""

    def __init__(self, d: int = 4, heads: int = 2, hidden: int = 5, *, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.fc2(F.relu(self.fc1(self.ln2(x))))
        x = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(x + self.fc2(F.relu(self.fc1(x))))


def _block(pre_norm: bool) -> Callable:
    def build() -> nn.Module:
        torch.manual_seed(3)
        m = Block(pre_norm=pre_norm).double().eval()
        with torch.no_grad():  # non-trivial norm parameters, so that they matter
            for ln in (m.ln1, m.ln2):
                ln.weight.add_(0.3 * torch.randn_like(ln.weight))
                ln.bias.add_(0.3 * torch.randn_like(ln.bias))
            for p in m.attn.parameters():
                if p.ndim == 1:
                    p.normal_(0, 0.3)
        return m

    return build


class Stack(nn.Module):
    """Two transformer blocks, a final LayerNorm and a linear head: residual streams that
    only LayerNorms read."""

    def __init__(self, *, pre_norm: bool) -> None:
        super().__init__()
        self.b1, self.b2 = Block(pre_norm=pre_norm), Block(pre_norm=pre_norm)
        self.ln, self.head = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(self.b2(self.b1(x))))


def _stack(pre_norm: bool) -> Callable:
    def build() -> nn.Module:
        torch.manual_seed(5)
        m = Stack(pre_norm=pre_norm).double().eval()
        for ln in m.modules():
            if isinstance(ln, nn.LayerNorm):
                # post-norm: scaling all that feeds block 2's LayerNorms is broken by eps
                # alone; a visible eps keeps that off the rank tolerance
                ln.eps = 0.1
        with torch.no_grad():  # non-trivial norm parameters and biases, so that they matter
            for p in m.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
            # each hidden ReLU unit active on about half of the tokens (a unit active on
            # few tokens has redundant incoming weights of its own)
            x = torch.randn(200, 3, 4, generator=torch.Generator().manual_seed(7)).double()
            for blk in (m.b1, m.b2):
                if blk.pre_norm:
                    h = blk.ln1(x)
                    h = blk.ln2(x + blk.attn(h, h, h)[0])
                else:
                    h = blk.ln1(x + blk.attn(x, x, x)[0])
                pre = blk.fc1(h).reshape(-1, blk.fc1.out_features)
                blk.fc1.bias.sub_(pre.median(0).values)
                x = blk(x)
        return m

    return build


def _centered(model: nn.Module) -> nn.Module:
    """Second-layer biases of `Tied` set to minus the median pre-activation on a standard
    normal batch: every unit is active on about half of the inputs (none dead or always
    active, which would add redundancy of their own)."""
    t = model[0]
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        pre = F.linear(t.r1(t.l1(x)), t.l2.weight)
        t.l2.bias.copy_(-pre.median(0).values)
    return model


def _x(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(*shape, generator=g, dtype=torch.float64)


ZOO: tuple[Entry, ...] = (
    Entry("mlp2", _mlp((5, 8, 3), nn.ReLU), _x(300, 5), dim=8),
    Entry("mlp3", _mlp((6, 5, 4, 2), nn.ReLU), _x(400, 6), dim=9),
    Entry("mlp4", _mlp((7, 6, 5, 4, 3), nn.ReLU, seed=1), _x(400, 7), dim=15),
    Entry("leaky", _mlp((4, 6, 5, 2), lambda: nn.LeakyReLU(0.1)), _x(400, 4), dim=11),
    Entry(
        "prelu", lambda: _seq(nn.Linear(3, 5), nn.PReLU(5, 0.2), nn.Linear(5, 2)), _x(300, 3), dim=5
    ),
    Entry("resnet", lambda: _randomize_bn(_seq(ResNet())), _x(100, 2, 4, 4), dim=21),
    Entry("concat_cnn", lambda: _seq(ConcatCNN()), _x(300, 2, 4, 4), dim=3 + 2 + 3),
    Entry("gcn", lambda: _init(example_gcn(9, (4, 4, 3), seed=1), 1), _x(100, 9, 4), dim=4),
    Entry("lowrank", lambda: _seq(LowRank()), _x(300, 5), dim=4 + 4),
    # pre-norm (d = 4, 2 heads of 2, hidden 5): per-feature scales after ln1 (into in_proj)
    # and ln2 (into fc1) 4 + 4, fc1 rescaling 5, β shifts of ln1 and ln2 4 + 4, their
    # mean-subtraction kernels 12 + 5, out_proj's bias along 1 (taken back by fc2) 1,
    # query-key and value-output GL 8 + 8, key and value shifts 4 + 4
    Entry(
        "prenorm",
        _block(True),
        _x(30, 3, 4),
        dim=4 + 4 + 5 + 4 + 4 + 12 + 5 + 1 + 8 + 8 + 4 + 4,
    ),
    # post-norm (d = 4, 2 heads of 2, hidden 5): query-key GL 2·2², value-output GL 2·2²,
    # key shift 4, value shift 4, fc1 rescaling 5, ln1's mean-subtraction kernel in fc1's
    # rows 5, out_proj and fc2 outputs along 1 (4 + 1, 5 + 1), ln1's β shift 4
    Entry("postnorm", _block(False), _x(30, 3, 4), dim=8 + 8 + 4 + 4 + 5 + 5 + 5 + 6 + 4),
    # two pre-norm blocks, final LayerNorm, head: per block 62 as above without the centered
    # bias; the residual stream only reaches LayerNorms, so out_proj and fc2 of both blocks
    # are free along 1 (2 · (4 + 1 + 5 + 1)); the final LayerNorm's feature scale, shift
    # and kernel in the head's 3 rows (4 + 4 + 3)
    Entry("prenorm2", _stack(True), _x(60, 3, 4), dim=2 * 62 + 2 * (5 + 6) + 4 + 4 + 3),
    # two post-norm blocks: 2 · 49 as above; block 1's ln2 feeds block 2 (its β shift 4, its
    # kernel in block 2's query, key and value rows 12); block 2's ln2 only feeds the final
    # LayerNorm (its β along 1, 1); the final LayerNorm into the head (4 + 4 + 3)
    Entry("postnorm2", _stack(False), _x(60, 3, 4), dim=2 * 49 + 4 + 12 + 1 + 4 + 4 + 3),
    Entry("gelu", _mlp((4, 6, 2), nn.GELU), _x(60, 4), breakers=("GELU",), dim=0),
    Entry("tanh", _mlp((4, 6, 2), nn.Tanh), _x(60, 4), breakers=("tanh",), dim=0),
    Entry(
        "relu6",
        _mlp((4, 6, 2), nn.ReLU6),
        lambda g: 12 * torch.randn(60, 4, generator=g, dtype=torch.float64),
        breakers=("ReLU6",),
        dim=0,
    ),
    Entry("tied", lambda: _centered(_seq(Tied(), seed=1)), _x(300, 4), breakers=("tied",), dim=1),
)
