"""Helpers for the rules' example models: built in float64 and eval mode from a fixed seed,
with inputs that reach every parameter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["batch", "seeded", "token_ids"]


def seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """`make()` under a fixed seed (the global generator is left as it was), in float64 and
    eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make().double().eval()


def batch(*shape: int, seed: int = 1) -> Tensor:
    """`shape` standard-normal float64 inputs from a fixed seed."""
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def token_ids(vocab: int, *shape: int, seed: int = 1) -> Tensor:
    """Token ids of `shape` that use every one of `vocab` ids at least once."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    ids.view(-1)[:vocab] = torch.randperm(vocab, generator=g)
    return ids
