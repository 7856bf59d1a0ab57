"""Canonical forms of individual factors, by factor type (a registry other parts extend)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._base import AbstractFactor, State

__all__ = ["canonicalizer_for", "register_canonicalizer"]

_CANONICALIZERS: list[tuple[type, Callable[[AbstractFactor, State], Tensor]]] = []


def register_canonicalizer(
    factor_type: type, fn: Callable[[AbstractFactor, State], Tensor]
) -> None:
    """Register `fn(factor, state) -> element`: the element of `factor` that brings `state`
    to that factor's canonical form. Later registrations take precedence."""
    _CANONICALIZERS.insert(0, (factor_type, fn))


def canonicalizer_for(factor: AbstractFactor) -> Callable[[AbstractFactor, State], Tensor] | None:
    return next((fn for t, fn in _CANONICALIZERS if isinstance(factor, t)), None)
