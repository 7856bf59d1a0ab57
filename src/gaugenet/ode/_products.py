"""Ordered products of many matrices in log depth: a balanced tree and a prefix scan."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ordered_product", "prefix_products"]


def ordered_product(mats: Tensor) -> Tensor:
    """`mats[..., s-1, :, :] @ ... @ mats[..., 0, :, :]` (later factors on the left), as a
    balanced tree of batched matmuls. `mats`: `(..., s, d, d)` with `s >= 1` → `(..., d, d)`.

    At a level with an odd count the last (latest) factor is set aside; the factors set aside
    are later than everything that remains, so they multiply the result from the left."""
    left = None
    while mats.shape[-3] > 1:
        if mats.shape[-3] % 2:
            last = mats[..., -1, :, :]
            left = last if left is None else left @ last
            mats = mats[..., :-1, :, :]
        mats = mats[..., 1::2, :, :] @ mats[..., 0::2, :, :]
    out = mats[..., 0, :, :]
    return out if left is None else left @ out


def prefix_products(F: Tensor) -> Tensor:
    """`P[0] = 1`, `P[k] = F[k-1] ⋯ F[0]`: a Hillis-Steele scan in log-depth batched matmuls."""
    P, k = F, 1
    while k < P.shape[0]:
        P = torch.cat([P[:k], P[k:] @ P[:-k]])
        k *= 2
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    return torch.cat([eye[None], P])
