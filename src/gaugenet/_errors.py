"""Errors raised by gaugenet."""

from __future__ import annotations


class GaugeError(ValueError):
    """Invalid gauge data: a non-positive scale, a singular or non-finite matrix,
    a violated boundary condition, an unsupported layer, mismatched shapes.

    The message always says what is wrong and where (factor, entry, layer).
    """


class NotLiftableError(GaugeError):
    """A discrete gauge transformation that no continuous gauge transformation
    (no diffeomorphism) reaches, e.g. a `G_n` with negative determinant."""


class UnsupportedModelError(GaugeError):
    """The model (or one of its operations) is outside what the analysis supports."""
