"""Shared test configuration.

Tests state their dtype explicitly (float64 for exact algebra, float32 where a
real model's precision is the point); nothing changes torch's global default.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    """Every test starts from the same global random state, whatever ran before it in the
    same worker (layers draw their initial weights from it)."""
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, so every test draws the same random numbers."""
    return torch.Generator().manual_seed(1234)
