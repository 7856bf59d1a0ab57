"""The free factor of a discovered group: translations of the entries the graph never reads
(found by `_unread.py`), joined to the other factors without counting a direction twice.

- A factor acting only on parameters that are free whole (a rescaling of a dead layer's
  units, the factors a never-called module declares for itself) is absorbed: its changes
  are translations of free entries already.
- Translations commute with the free shifts, so they may act on free entries too.
- Any other factor acting on a parameter (a rescaling or rotation of a table's columns)
  does not commute with shifting part of it: that parameter is not claimed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..groups import AbstractFactor, FreeFactor, FreeRows, TranslationFactor
from ._selfcheck import _prune
from ._unread import Unread

__all__ = ["with_free"]


def _claimable(unread: Unread, factors: list[AbstractFactor]) -> tuple[set[str], dict, set[str]]:
    """`(whole, rows, absorbed)`: the parameters free whole, the tables' free rows, and the
    names of the absorbed factors, once no factor that does not commute acts on a claim."""
    whole, rows = set(unread.whole), dict(unread.rows)
    while True:
        absorbed = {f.name for f in factors if f.params() and set(f.params()) <= whole}
        clash = {
            p
            for f in factors
            if f.name not in absorbed and not isinstance(f, TranslationFactor)
            for p in f.params()
            if p in whole or p in rows
        }
        if not clash:
            return whole, rows, absorbed
        whole -= clash
        for p in clash:
            rows.pop(p, None)


def with_free(factors: list[AbstractFactor], unread: Unread, model: nn.Module) -> list:
    """`factors` without the absorbed ones and with the free factor (named `"free"`) last,
    when anything is free."""
    whole, rows, absorbed = _claimable(unread, factors)
    terms, offset = [], 0
    for name, p in model.named_parameters():
        if name in whole:
            r = torch.arange(p.shape[0] if p.ndim else 1)
        elif name in rows:
            r = rows[name]
        else:
            continue
        width = math.prod(p.shape[1:]) if p.ndim else 1
        if width == 0 or r.numel() == 0:
            continue
        terms.append(FreeRows(name, r, width, offset))
        offset += terms[-1].size
    kept = _prune(factors, absorbed)
    if not terms:
        return kept
    modules = tuple(dict.fromkeys(t.param.rpartition(".")[0] for t in terms))
    return [*kept, FreeFactor("free", offset, terms=tuple(terms), modules=modules)]
