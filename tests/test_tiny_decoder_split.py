"""The quantization benchmark's corpus split: whole topics, drawn once, about 80/10/10."""

from __future__ import annotations

import importlib.util
import pydoc_data.topics as topics
from pathlib import Path

import torch

# loaded from its file, so that the benchmarks folder (whose module names are generic) stays
# off sys.path for the rest of the suite
_spec = importlib.util.spec_from_file_location(
    "tiny_decoder", Path(__file__).parents[1] / "benchmarks" / "tiny_decoder.py"
)
tiny_decoder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_decoder)


def _bytes(names: list[str]) -> int:
    return sum(len(topics.topics[k].encode("utf-8")) for k in names)


def test_parts_are_disjoint_whole_topics_covering_the_corpus() -> None:
    split = tiny_decoder.split_topics()
    assert set(split) == set(tiny_decoder.PARTS)
    names = [k for part in split.values() for k in part]
    assert sorted(names) == sorted(topics.topics)  # every topic once, in one part
    total = _bytes(names)
    for part in ("validation", "held_out"):
        share = _bytes(split[part]) / total
        assert 0.08 <= share <= tiny_decoder.EVAL_FRACTION, (part, share)
    assert _bytes(split["train"]) / total >= 0.78


def test_split_is_deterministic_and_set_by_its_seed() -> None:
    assert tiny_decoder.split_topics() == tiny_decoder.split_topics()
    other = tiny_decoder.split_topics(seed=tiny_decoder.SPLIT_SEED + 1)
    assert other["held_out"] != tiny_decoder.split_topics()["held_out"]


def test_corpus_parts_are_the_topics_text_and_the_digest_follows_them(monkeypatch) -> None:
    train, val, held = tiny_decoder.corpus()
    split = tiny_decoder.split_topics()
    for tokens, part in zip((train, val, held), tiny_decoder.PARTS):
        text = "\n\n".join(topics.topics[k] for k in split[part]).encode("utf-8")
        assert bytes(tokens.tolist()) == text
        assert tokens.dtype == torch.long
    # a held-out topic's text is nowhere in the training part
    probe = topics.topics[max(split["held_out"], key=lambda k: len(topics.topics[k]))]
    assert probe.encode("utf-8") not in bytes(train.tolist())
    digest = tiny_decoder.corpus_digest()
    assert len(digest) == 10 and digest == tiny_decoder.corpus_digest()
    # the cache key's digest changes when a byte moves from one part to the next
    moved = (train[:-1], torch.cat([train[-1:], val]), held)
    monkeypatch.setattr(tiny_decoder, "corpus", lambda: moved)
    assert tiny_decoder.corpus_digest() != digest
