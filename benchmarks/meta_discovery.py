"""Discovery on the meta device at the scale of Llama-2-7B: time and peak memory.

A `LlamaForCausalLM` with the Llama-2-7B configuration (hidden 4096, 32 layers, 32 heads,
intermediate 11008, vocabulary 32000; 6.7 B parameters) is built on the meta device, so
it holds shapes but no values, and `gaugenet.symmetries` analyzes it from shapes alone.
Prints the wall time of the analysis and the peak resident memory of the process.

Run: `HF_HUB_OFFLINE=1 python benchmarks/meta_discovery.py [--layers 32]`
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import transformers

import gaugenet


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the labels are small tensors)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        use_cache=False,
    )
    before = _peak_rss_mib()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    n = sum(p.numel() for p in model.parameters())
    inputs = {"input_ids": torch.zeros(1, args.tokens, dtype=torch.long)}
    start, cpu = time.perf_counter(), time.process_time()
    group = gaugenet.symmetries(model, inputs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"model: LlamaForCausalLM, {args.layers} layers, {n / 1e9:.2f} B parameters (meta)")
    print(f"group: {group}")
    print(f"checked numerically: {group.checked} ({group.unchecked})")
    print(f"discovery time: {seconds:.1f} s wall, {cpu:.1f} s CPU ({args.threads} torch thread(s))")
    print(f"peak RSS: {_peak_rss_mib():.0f} MiB (before building the model: {before:.0f} MiB)")


if __name__ == "__main__":
    main()
