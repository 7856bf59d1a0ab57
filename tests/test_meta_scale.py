"""Discovery at scale: the label bookkeeping holds per-channel data, not a label per entry of
every node (a 7B-shaped model on the meta device is analyzed in about 1 GB,
`benchmarks/meta_discovery.py`). Checked on a small meta Llama with many tokens, where a
label per entry would cost tokens times more."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import fx

import gaugenet
from gaugenet.discovery import _symmetries
from gaugenet.discovery._labels import FIXED, Labels, terms_by_factor, terms_of
from gaugenet.discovery._propagate import Propagator, _ids_in

transformers = pytest.importorskip("transformers")

TOKENS = 32


class _Recording(Propagator):
    """A propagator that records, for every node, the distinct ids of its label maps when
    made, the largest number of map entries held at once, and the entries of all maps."""

    last: _Recording | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made: dict[fx.Node, tuple[set[int], set[int]]] = {}
        self.peak = self.total = 0
        _Recording.last = self

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        lab = self.env_labels.get(n)
        if isinstance(lab, tuple) and len(lab) == 2 and isinstance(lab[0], torch.Tensor):
            self.made[n] = (set(lab[0].unique().tolist()), set(lab[1].unique().tolist()))
            self.total += lab[0].numel()
        held = sum(
            lab[0].numel()
            for lab in self.env_labels.values()
            if isinstance(lab, tuple) and isinstance(lab[0], torch.Tensor)
        )
        self.peak = max(self.peak, held)
        return out


def _meta_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=TOKENS,
        use_cache=False,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).eval()


def test_label_maps_are_dropped_after_their_last_reader(monkeypatch) -> None:
    monkeypatch.setattr(_symmetries, "Propagator", _Recording)
    group = gaugenet.symmetries(
        _meta_llama(), {"input_ids": torch.zeros(1, TOKENS, dtype=torch.long)}
    )
    prop = _Recording.last
    assert prop is not None and group.dim > 0 and prop.made
    # a few nodes' maps at a time, not all of them (the whole graph's maps were held before)
    assert prop.peak * 5 < prop.total
    kept = 0
    for n, (scales, perms) in prop.made.items():
        carried = prop.carried(n)
        assert carried is not None, n.name
        # the same ids as the map had, which is all the later passes read
        assert set(carried[0].tolist()) == scales and set(carried[1].tolist()) == perms, n.name
        kept += carried[0].numel()
    # per channel: the ids repeated over tokens are not kept
    assert kept * TOKENS // 4 < prop.total


def test_ids_in_keeps_every_id_once_per_channel() -> None:
    per_channel = torch.arange(5, 21).expand(1, TOKENS, 16).clone()
    ids = _ids_in(per_channel)
    assert ids.tolist() == list(range(5, 21))  # one row: the other tokens repeat it
    assert ids.untyped_storage().data_ptr() != per_channel.untyped_storage().data_ptr()
    # one token with other ids: its ids are kept too (the rows are not all equal)
    odd = per_channel.clone()
    odd[0, 7, 3] = 99
    assert set(_ids_in(odd).tolist()) == set(range(5, 21)) | {99}
    # ids varying along two axes (heads and head features): the distinct ids
    heads = (torch.arange(4)[:, None] * 10 + torch.arange(3)).expand(2, TOKENS, 4, 3)
    assert sorted(_ids_in(heads).tolist()) == sorted(heads.unique().tolist())
    assert _ids_in(torch.tensor(7)).tolist() == [7]
    assert _ids_in(torch.zeros(0, 3, dtype=torch.long)).numel() == 0


def test_roots_are_the_union_find_roots() -> None:
    rng = random.Random(0)
    L = Labels()
    L.fresh(500, "a")
    for _ in range(400):
        L.union(rng.randrange(501), rng.randrange(501))
    roots = L.roots()
    assert len(set(roots.tolist())) < 200  # merged into chains, not only pairs
    assert roots.tolist() == [L.find(i) for i in range(len(L.parent))] + [FIXED]


def test_terms_by_factor_match_terms_of_each_factor(gen) -> None:
    """All factors' terms in one pass over the records are each factor's `terms_of`, with
    the same records in the same order (a record touching two factors gives a term to each)."""
    n_ids, sizes = 40, [3, 5, 2]
    fac = torch.full((n_ids + 1,), -1)
    pos = torch.full((n_ids + 1,), -1)
    ids = torch.randperm(n_ids - 1, generator=gen)[: sum(sizes)] + 1
    for k, part in enumerate(torch.split(ids, sizes)):
        fac[part], pos[part] = k, torch.arange(len(part))
    records = [
        (f"p{r}.weight", torch.randint(-1, n_ids, (2, 3), generator=gen), (-1) ** r)
        for r in range(12)
    ]
    records.append(("bnshift", "bn", 1e-5, ids[:4]))
    records.append(("g.weight", ids[-3:], 1, 1.0))  # a gain read with an offset
    together = terms_by_factor(records, fac, pos, sizes)
    for k, n in enumerate(sizes):
        lut = torch.where(fac == k, pos, n)
        alone = terms_of(records, lut, n)
        assert [repr(t) for t in together[k]] == [repr(t) for t in alone] and alone
    # a record no factor reads is nobody's term
    assert not terms_by_factor([("q", torch.tensor([0, -1]), 1)], fac, pos, sizes)[0]
