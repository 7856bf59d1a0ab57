"""A fingerprint of the computation a model performs, independent of its weights' values."""

from __future__ import annotations

import hashlib

from torch import nn

from ..groups import model_signature

__all__ = ["fingerprint"]


def fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit digest of what `model` computes, up to the values of its tensors.

    It is the digest of the model's `ModelSignature` (every parameter's and buffer's name and
    shape; every submodule's class, plain settings and a digest of its `forward` code; the
    signature a gauge group checks models against) together with the tensors' dtypes. Two
    checkpoints with equal fingerprints have the same gauge group, so a sweep discovers it
    once per fingerprint, and the group's own check refuses any model it was not found for.
    """
    h = hashlib.sha256(model_signature(model).digest.encode())
    for kind, items in (("P", model.named_parameters()), ("B", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind} {name} {t.dtype}\n".encode())
    return h.hexdigest()[:16]
