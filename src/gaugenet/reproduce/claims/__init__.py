"""Claim modules, one per part of the paper; each registers its claims on import."""
