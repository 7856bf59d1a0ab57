"""Figures of gauge transformations."""

from ._diffeomorphism import diffeomorphism as diffeomorphism
