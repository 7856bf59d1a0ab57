"""How far the rounded model's outputs are from the float model's: the output objective.

A distance is a function `(y_q, y) ↦` scalar tensor, differentiable in `y_q` (the learned
element descends it). The default, `squared_error`, treats every output entry alike; for a
model whose outputs are logits, `logit_kl` weighs them as the predicted distribution does,
which is what perplexity and accuracy see.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.nn.functional import cross_entropy, kl_div, log_softmax

__all__ = ["OutputDistance", "logit_kl", "next_token_loss", "squared_error"]

OutputDistance = Callable[[Tensor, Tensor], Tensor]


def squared_error(y_q: Tensor, y: Tensor) -> Tensor:
    """`Σ (y_q − y)²` over every entry."""
    return ((y_q - y) ** 2).sum()


def logit_kl(y_q: Tensor, y: Tensor) -> Tensor:
    """`Σ_rows KL(softmax(y) ‖ softmax(y_q))`, classes on the last axis: the next-token (or
    class) distribution lost by rounding, summed over tokens (or samples)."""
    return kl_div(log_softmax(y_q, -1), log_softmax(y, -1), log_target=True, reduction="sum")


def next_token_loss(input_ids: Tensor) -> OutputDistance:
    """The loss `(y_q, y) ↦ Σ_t −log softmax(y_q)_t[x_{t+1}]` of a causal language model
    whose logits `y_q` `(batch, seq, vocab)` were computed on `input_ids` `(batch, seq)`: the
    next-token loss of the rounded model on the calibration text (SpinQuant's training
    loss). It ignores the float logits `y`, so it rewards what the held-out perplexity
    rewards rather than closeness to the float model."""
    targets = input_ids[:, 1:].reshape(-1)

    def loss(y_q: Tensor, y: Tensor) -> Tensor:
        return cross_entropy(y_q[:, :-1].reshape(targets.numel(), -1), targets, reduction="sum")

    return loss
