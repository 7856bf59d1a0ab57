"""A small Llama decoder trained here on a real English corpus, for the quantization benchmark.

Corpus: the Python Language Reference topics that ship with CPython's standard library
(`pydoc_data.topics`, 79 topics, about 465 kB of English prose and code examples; present
offline on every Python install). Byte-level tokens (vocabulary 256). The corpus is split by
whole topics, so that the three parts are drawn from the same distribution (`split_topics`):
the topics, in the order of a permutation seeded with `SPLIT_SEED`, go first-fit to the
held-out part, else to the validation part, while each stays within `EVAL_FRACTION` (10 %) of
the corpus's bytes, and otherwise to training (about 80 / 10 / 10 by bytes). Each part is its
topics, sorted by name, joined. Training reads only the training part; the validation part
(for choosing among candidates) is never trained on and never scored as held out; the
held-out part is only scored.

The model is a `transformers.LlamaForCausalLM` built from a config (random init: 4 layers,
hidden 128, 4 heads, MLP 384, untied head), trained with AdamW for a few CPU minutes and
cached as safetensors under `$GAUGENET_CACHE` (default `~/.cache/gaugenet`), keyed by the
model's depth and width, the steps and a digest of the three parts' bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

CORPUS = (
    "CPython pydoc_data.topics (Python Language Reference), bytes; whole topics drawn "
    "(seed 0) to train / validation / held out, about 80/10/10"
)
CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    use_cache=False,  # logits only: no key/value cache in the outputs
)
SEQ = 128
STEPS, BATCH, LR = 2000, 8, 3e-3
SPLIT_SEED, EVAL_FRACTION = 0, 0.1
PARTS = ("train", "validation", "held_out")


def cache_dir() -> Path:
    return Path(os.environ.get("GAUGENET_CACHE", Path.home() / ".cache" / "gaugenet"))


def split_topics(seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """The topic names of each part, `{"train", "validation", "held_out"}` (each sorted).

    The topics are visited in the order of `torch.randperm` seeded with `seed`; each goes to
    the held-out part if that part stays within `EVAL_FRACTION` of the corpus's bytes with it,
    else to the validation part under the same bound, else to training. Deterministic."""
    import pydoc_data.topics as t

    names = sorted(t.topics)
    size = {k: len(t.topics[k].encode("utf-8")) for k in names}
    cap = EVAL_FRACTION * sum(size.values())
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    used = {"held_out": 0, "validation": 0}
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))
    for k in (names[i] for i in order.tolist()):
        part = next((p for p in ("held_out", "validation") if used[p] + size[k] <= cap), "train")
        parts[part].append(k)
        if part != "train":
            used[part] += size[k]
    return {p: sorted(v) for p, v in parts.items()}


def corpus() -> tuple[Tensor, Tensor, Tensor]:
    """`(train, validation, held_out)` byte tensors (int64): each part's topics (see
    `split_topics`), sorted by name and joined by blank lines."""
    import pydoc_data.topics as t

    def part(names: list[str]) -> Tensor:
        text = "\n\n".join(t.topics[k] for k in names).encode("utf-8")
        return torch.tensor(list(text), dtype=torch.long)

    split = split_topics()
    return part(split["train"]), part(split["validation"]), part(split["held_out"])


def windows(tokens: Tensor, n: int | None = None, seq: int = SEQ) -> Tensor:
    """Non-overlapping `(n, seq)` windows from the start of `tokens` (all that fit if `n` is
    None)."""
    k = len(tokens) // seq if n is None else min(n, len(tokens) // seq)
    return tokens[: k * seq].reshape(k, seq)


def corpus_digest() -> str:
    """A short digest of the three parts' bytes (changes with the split or the corpus)."""
    h = hashlib.sha256()
    for tokens in corpus():
        h.update(len(tokens).to_bytes(8, "little"))
        h.update(bytes(tokens.tolist()))
    return h.hexdigest()[:10]


def build(config: dict | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(config or CONFIG))
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def perplexity(model: nn.Module, batch: Tensor, chunk: int = 16) -> float:
    """`exp` of the mean next-byte cross-entropy over the windows `batch` `(n, seq)`."""
    return perplexity_and_kl(model, batch, chunk=chunk)[0]


def perplexity_and_kl(
    model: nn.Module, batch: Tensor, reference: list[Tensor] | None = None, chunk: int = 16
) -> tuple[float, float]:
    """`perplexity(model, batch)` and, from the same forward passes, `Σ KL(ref ‖ model)` of
    the next-byte distributions over every token of `batch` (nats; `0` without
    `reference`). `reference`: the float model's logits of each `chunk` of windows, filled
    here when empty (so a caller keeps them for the next model)."""
    from gaugenet.apply import logit_kl

    total, count, kl = 0.0, 0, 0.0
    with torch.no_grad():
        for k, part in enumerate(batch.split(chunk)):
            out = model(input_ids=part).logits
            logits = out[:, :-1].double()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + float(nll), count + part[:, 1:].numel()
            if reference is not None:
                if len(reference) == k:
                    reference.append(out)
                kl += float(logit_kl(out.double(), reference[k].double()))
    return math.exp(total / count), kl


def trained(steps: int = STEPS, log=print) -> nn.Module:
    """The trained decoder, from the cache when present (keyed by depth × width, steps and
    `corpus_digest`, so a model trained on another split is not reused)."""
    from safetensors.torch import load_file, save_file

    shape = f"{CONFIG['num_hidden_layers']}x{CONFIG['hidden_size']}"
    key = f"llama-pydoc-topics-{corpus_digest()}-{shape}-{steps}"
    path = cache_dir() / f"{key}.safetensors"
    model = build()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    train_tokens, val, held = corpus()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        start = torch.randint(0, len(train_tokens) - SEQ - 1, (BATCH,), generator=g)
        x = torch.stack([train_tokens[s : s + SEQ] for s in start.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"    step {step:5d}  loss {float(loss):.3f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(
        json.dumps({"corpus": CORPUS, "split": split_topics(), "config": CONFIG,
                    "steps": steps, "validation_ppl": perplexity(model, windows(val)),
                    "held_out_ppl": perplexity(model, windows(held))})
    )  # fmt: skip
    return model


if __name__ == "__main__":
    torch.set_num_threads(1)  # more threads only contend on a shared machine
    m = trained()
    for name, tokens in zip(PARTS, corpus()):
        print(f"{name}: {len(tokens)} bytes, perplexity {perplexity(m, windows(tokens)):.3f}")
