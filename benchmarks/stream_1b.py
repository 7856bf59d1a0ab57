"""Streaming a 1.1 B-parameter Llama-shaped checkpoint: peak memory and time of
`gaugenet equalize` and `gaugenet quantize` on a sharded safetensors folder.

1. Writes a random checkpoint (TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4
   key-value heads, intermediate 5632, vocabulary 32000; bfloat16, shards of about 500 MB)
   tensor by tensor, so that writing it needs little memory too. The MLP's up-projection
   rows get ranges spread over two decades (as trained models have), so that equalization
   has something to balance.
2. Runs `python -m gaugenet equalize` and `python -m gaugenet quantize --scheme w4` on it,
   each as a child process; prints each one's wall time and peak RSS (`os.wait4`).
3. Loads the input, the equalized and the quantized checkpoints with `transformers`, one at
   a time, each in its own child process (in bfloat16: 2.2 GB of weights; float32 would
   need 4.4 GB), and compares their logits on 16 tokens: the equalized output must match
   the input up to bfloat16 rounding, the quantized one must not.

Run: `HF_HUB_OFFLINE=1 python benchmarks/stream_1b.py [--dir DIR] [--layers 22]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_LOGITS = """
import sys, resource, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
ids = torch.arange(16).reshape(1, 16) * 997 % 32000
with torch.no_grad():
    torch.save(m(input_ids=ids).logits.float(), sys.argv[2])
"""


def _config(layers: int):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        use_cache=False,
    )


def write_checkpoint(path: Path, layers: int, shard_bytes: int = 500 * 2**20) -> int:
    """A random sharded bfloat16 checkpoint in `path`; returns its parameter count."""
    import transformers
    from safetensors.torch import save_file

    config = _config(layers)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total, count = 0, 0, 0
    names = list(meta.state_dict())
    files = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        files.append((name, list(shards[-1])))
        shards[-1] = {}

    for name in names:
        shape = meta.state_dict()[name].shape
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
            if name.endswith("up_proj.weight"):
                t *= torch.logspace(-1, 1, shape[0])[torch.randperm(shape[0], generator=gen)][
                    :, None
                ]
        t = t.to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        size, total, count = size + nbytes, total + nbytes, count + t.numel()
    flush()
    n = len(files)
    wmap = {}
    for i, (old, keys) in enumerate(files):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (path / old).rename(path / new)
        wmap.update({k: new for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": wmap}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return count


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """`(seconds, peak RSS in MiB, stdout)` of a child process, which must succeed; the
    peak RSS is the child's own (`os.wait4`)."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read().decode()[-3000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read().decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="gaugenet-stream-"))
    src, eq, q = work / "in", work / "equalized", work / "quantized"
    if not src.exists():
        start = time.perf_counter()
        n = write_checkpoint(src, args.layers)
        print(
            f"wrote {src}: {n / 1e9:.2f} B parameters (bfloat16) in "
            f"{len(list(src.glob('*.safetensors')))} shards, {time.perf_counter() - start:.0f} s"
        )
    py = [sys.executable, "-m", "gaugenet"]
    for name, cmd in (
        ("equalize", [*py, "equalize", str(src), "--out", str(eq), "--bits", "4", "--json"]),
        ("quantize", [*py, "quantize", str(src), "--out", str(q), "--scheme", "w4", "--json"]),
    ):
        seconds, rss, out = _run([*cmd, "--force"])
        r = json.loads(out)
        print(
            f"gaugenet {name}: {seconds:.0f} s, peak RSS {rss:.0f} MiB; "
            f"factors {r['applied']}/{r['factors']} moved, skipped {len(r['skipped'])}, "
            f"local change {r['local_change']:.1e}, objective {r['error_before']:.4g} -> "
            f"{r['error_after']:.4g}, rounded {r['rounded']}"
        )
    logits = {}
    for name, path in (("input", src), ("equalized", eq), ("quantized", q)):
        file = work / f"logits-{name}.pt"
        seconds, rss, _ = _run([sys.executable, "-c", _LOGITS, str(path), str(file)])
        logits[name] = torch.load(file, weights_only=True)
        print(
            f"transformers load + logits ({name}, bfloat16): {seconds:.0f} s, "
            f"peak RSS {rss:.0f} MiB"
        )
    ref = logits["input"]
    for name in ("equalized", "quantized"):
        d = float((logits[name] - ref).abs().max() / ref.abs().max())
        print(f"logits {name} vs input: max relative difference {d:.2e}")


if __name__ == "__main__":
    main()
