"""A full-weight job's loop in one process against the same loop sharded over N ranks
(FSDP2 under torchrun; gloo on a CPU host, NCCL on GPUs), side by side in one run
(figures go in docs/performance.md): the start-up the ranks add, steps per second, and
each process's peak memory.

The model is a randomly initialised Llama of about --params parameters with the test
fixture's tokenizer (benchmarks/bench_model_cache.py builds it); CATNIP, batch 4 of
--length tokens, gradient_accumulation_steps N (one micro-batch per rank and step).
On the CPU the ranks share the host's cores (each gets threads / N), so this measures
what sharding costs, not what it gains: that is memory per device on GPUs.

    python benchmarks/bench_sharded.py [--params 60e6] [--steps 6] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_model_cache import random_llama
from core.engine.data import Example
from core.engine.modeling import AdapterSpec, load_base, peak_memory, pick_device, wrap
from core.engine.sharded import run_sharded
from core.engine.spec.methods import METHODS, parse_params
from core.engine.train import run_unlearning


def examples(count: int, length: int, vocab: int) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(5, vocab, (count, length), generator=generator).tolist()
    return [Example(row, row) for row in rows]


def one_process(root: Path, method, params, device, args) -> dict:  # type: ignore[no-untyped-def]
    """The loop as a job's own process runs it: wall and loop seconds, peak memory."""
    started = time.monotonic()
    model, tokenizer = load_base(root / "model", device)
    wrapped = wrap(model, AdapterSpec(type="full"), need_reference=False)
    forget = examples(4 * args.ranks * args.steps, args.length, 32000)
    result = run_unlearning(wrapped, method, params, forget, pad_id=tokenizer.pad_token_id)
    tokens = 4 * args.ranks * args.length * args.steps
    return {
        "wall": time.monotonic() - started,
        "loop": tokens / result.history[-1].tokens_per_second,
        "peak": peak_memory(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=60e6)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--one-process", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = pick_device(None)
    method = METHODS["catnip"]
    params = parse_params(
        "catnip",
        {
            "max_steps": args.steps,
            "batch_size": 4,
            "gradient_accumulation_steps": args.ranks,
            "learning_rate": 1e-5,
            "max_length": args.length,
        },
    )
    if args.one_process:
        print(json.dumps(one_process(Path(args.one_process), method, params, device, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        count = random_llama(root, args.params)
        forget = examples(4 * args.ranks * args.steps, args.length, 32000)
        print(f"{count / 1e6:.0f}M parameters, {device.type}, {torch.get_num_threads()} threads")

        one = json.loads(  # in a process of its own, as the ranks are: a fair peak
            subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one-process", str(root)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.splitlines()[-1]
        )
        model, tokenizer = load_base(root / "model", device)  # the job's copy: gets the result
        wrapped = wrap(model, AdapterSpec(type="full"), need_reference=False)
        started = time.monotonic()
        sharded = run_sharded(
            wrapped,
            method,
            params,
            forget,
            pad_id=tokenizer.pad_token_id,
            source=root / "model",
            processes=args.ranks,
            device=device,
            work_dir=root / "work",
        )
        two_wall = time.monotonic() - started

    tokens = 4 * args.ranks * args.length * args.steps  # every sequence is full length

    def loop_seconds(history) -> float:  # type: ignore[no-untyped-def]
        """The loop's own seconds (tokens_per_second counts from its start)."""
        return tokens / history[-1].tokens_per_second

    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**30:.2f}"

    one_wall, one_loop, one_peak = one["wall"], one["loop"], one["peak"]
    two_loop = loop_seconds(sharded.history)
    print("| run | wall s | of which the loop | start-up | peak host GiB | peak device GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| 1 process (the job's own) | {one_wall:.1f} | {one_loop:.1f} | "
        f"{one_wall - one_loop:.1f} | {gib(one_peak['host_bytes'])} | "
        f"{gib(one_peak['device_bytes'])} |"
    )
    for rank, peak in enumerate(sharded.ranks_peak_memory or []):
        times = (
            f"{two_wall:.1f} | {two_loop:.1f} | {two_wall - two_loop:.1f}" if rank == 0 else " | | "
        )
        print(
            f"| {args.ranks} ranks: rank {rank} | {times} | {gib(peak['host_bytes'])} | "
            f"{gib(peak['device_bytes'])} |"
        )
    print(f"\nloop time, {args.ranks} ranks vs 1 process: {two_loop / one_loop:.2f}x")


if __name__ == "__main__":
    main()
