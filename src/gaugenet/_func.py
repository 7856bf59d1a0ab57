"""When `torch.func` cannot transform a model."""

from __future__ import annotations

__all__ = ["untransformable"]


def untransformable(exc: BaseException) -> bool:
    """Whether `exc`, raised under a `torch.func` transform, says the model's code cannot be
    transformed (an `autograd.Function` without `setup_context`, as BLOOM's GELU; another
    functorch limit) rather than that it failed: the caller then computes the same thing
    with plain autograd."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("setup_context" in text or "functorch" in text)
