"""A small Llama decoder trained here on a real English corpus, for the quantization benchmark.

Corpus: the Python Language Reference topics that ship with CPython's standard library
(`pydoc_data.topics`, about 465 kB of English prose and code examples; present offline on
every Python install). Byte-level tokens (vocabulary 256). The topics, sorted by name and
joined, are split once: the last tenth of the bytes is held out, the rest trains the model.

The model is a `transformers.LlamaForCausalLM` built from a config (random init: 4 layers,
hidden 128, 4 heads, MLP 384, untied head), trained with AdamW for a few CPU minutes and
cached as safetensors under `$GAUGENET_CACHE` (default `~/.cache/gaugenet`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

CORPUS = "CPython pydoc_data.topics (Python Language Reference), bytes; last 10% held out"
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
STEPS, BATCH, LR = 500, 8, 3e-3


def cache_dir() -> Path:
    return Path(os.environ.get("GAUGENET_CACHE", Path.home() / ".cache" / "gaugenet"))


def corpus() -> tuple[Tensor, Tensor]:
    """`(train, held_out)` byte tensors (int64) of the corpus."""
    import pydoc_data.topics as t

    text = "\n\n".join(t.topics[k] for k in sorted(t.topics)).encode("utf-8")
    tokens = torch.tensor(list(text), dtype=torch.long)
    cut = len(tokens) * 9 // 10
    return tokens[:cut], tokens[cut:]


def windows(tokens: Tensor, n: int | None = None, seq: int = SEQ) -> Tensor:
    """Non-overlapping `(n, seq)` windows from the start of `tokens` (all that fit if `n` is
    None)."""
    k = len(tokens) // seq if n is None else min(n, len(tokens) // seq)
    return tokens[: k * seq].reshape(k, seq)


def training_starts(steps: int = STEPS) -> Tensor:
    """The start of every window `trained` drew, `(steps, BATCH)`: the same generator and
    draws, replayed (nothing else consumes that generator)."""
    n = len(corpus()[0])
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randint(0, n - SEQ - 1, (BATCH,), generator=g) for _ in range(steps)])


def unseen_windows(avoid: Tensor, steps: int = STEPS, seq: int = SEQ) -> Tensor:
    """Windows `(n, seq)` of the training split that training never read (about 30 % of its
    bytes fall in no drawn window) and that overlap none of the windows starting at `avoid`:
    text from the training split that is new to the model, for choosing among candidates
    without touching the held-out tenth. Non-overlapping, in order of position."""
    train = corpus()[0]
    seen = torch.zeros(len(train) + 1, dtype=torch.long)
    for s in (*training_starts(steps).reshape(-1).tolist(), *avoid.tolist()):
        seen[s] += 1
        seen[s + seq] -= 1
    covered = seen.cumsum(0)[: len(train)] > 0
    out, s = [], 0
    while s + seq <= len(train):
        bad = covered[s : s + seq].nonzero()
        if len(bad):
            s += int(bad[-1]) + 1
            continue
        out.append(train[s : s + seq])
        s += seq
    return torch.stack(out)


def build(config: dict | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(config or CONFIG))
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def perplexity(model: nn.Module, batch: Tensor, chunk: int = 16) -> float:
    """`exp` of the mean next-byte cross-entropy over the windows `batch` `(n, seq)`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for part in batch.split(chunk):
            logits = model(input_ids=part).logits[:, :-1].double()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + float(nll), count + part[:, 1:].numel()
    return math.exp(total / count)


def trained(steps: int = STEPS, log=print) -> nn.Module:
    """The trained decoder, from the cache when present (keyed by config and steps)."""
    from safetensors.torch import load_file, save_file

    key = f"llama-pydoc-{CONFIG['num_hidden_layers']}x{CONFIG['hidden_size']}-{steps}"
    path = cache_dir() / f"{key}.safetensors"
    model = build()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    train_tokens, held = corpus()
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
        json.dumps({"corpus": CORPUS, "config": CONFIG, "steps": steps,
                    "held_out_ppl": perplexity(model, windows(held, 64))})
    )  # fmt: skip
    return model


if __name__ == "__main__":
    torch.set_num_threads(1)  # more threads only contend on a shared machine
    m = trained()
    print("held-out perplexity", perplexity(m, windows(corpus()[1], 64)))
