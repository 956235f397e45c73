"""What the worker's warm model cache saves at a job's start: loading a base model from
its directory (what every job did) against a cache miss (the same load, kept) and cache
hits (a copy of the kept weights, as a full-weight job gets; the kept weights shared, as
a LoRA job gets), side by side in one run (figures go in docs/performance.md).

The model is a randomly initialised Llama of about --params parameters (fp32 on the CPU,
the worker's dtype there), saved as safetensors with the test fixture's tokenizer. The
files are in the page cache after being written: a load from a cold disk is slower still.

    python benchmarks/bench_model_cache.py [--params 300e6] [--hits 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.demo.build import build_model
from core.engine.model_cache import ModelCache, model_bytes
from core.engine.modeling import load_base


def random_llama(directory: Path, params: float) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    build_model(directory / "fixture", "fixture", seed=0)  # for its tokenizer
    hidden, vocab = 1024, 32000
    layers = max(1, round((params - 2 * vocab * hidden) / (12 * hidden * hidden)))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory / "model")
    for name in (directory / "fixture" / "model").iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, directory / "model" / name.name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=300e6)
    parser.add_argument("--hits", type=int, default=3)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        count = random_llama(root, args.params)
        path = root / "model"
        tokens = torch.randint(0, 32000, (1, 64))

        def first_forward(load) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
            """(seconds to load, seconds to load and run a first forward, bytes)."""
            started = time.monotonic()
            model, _ = load()
            loaded = time.monotonic() - started
            with torch.no_grad():
                model(tokens)  # touches every weight (a memory-mapped one is read here)
            total = time.monotonic() - started
            size = model_bytes(model)
            del model
            return loaded, total, size

        direct, direct_first, size = first_forward(lambda: load_base(path, cpu))
        cache = ModelCache(4 * size)
        miss, miss_first, _ = first_forward(lambda: cache.load(path, cpu, shared=True))
        hits = {}
        for shared in (False, True):
            runs = [
                first_forward(lambda: cache.load(path, cpu, shared=shared))  # noqa: B023
                for _ in range(args.hits)
            ]
            hits[shared] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )
    print(f"model: {count / 1e6:.0f}M parameters, {size / 1e9:.2f} GB (fp32)")
    print("| load | seconds to load | to load and run a first forward | vs the files |")
    print("|---|---:|---:|---:|")
    print(f"| from the files (no cache) | {direct:.2f} | {direct_first:.2f} | 1.00 |")
    print(
        f"| cache miss (the same, kept; a LoRA job) | {miss:.2f} | {miss_first:.2f} "
        f"| {miss_first / direct_first:.2f} |"
    )
    for shared, what in ((False, "a copy: full-weight jobs"), (True, "shared: LoRA jobs")):
        hit, hit_first = hits[shared]
        print(
            f"| cache hit, {what} (median of {args.hits}) | {hit:.2f} | {hit_first:.2f} "
            f"| {hit_first / direct_first:.2f} |"
        )


if __name__ == "__main__":
    main()
