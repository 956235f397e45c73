"""Full-weight unlearning in bf16 (the GPU default) with and without fp32 master weights,
against the same run in fp32, side by side in one run (figures go in the README).

For each run: the flat weight update after N CATNIP steps (final - initial weights, as
the model holds them), its size relative to the fp32 run's update, its cosine with it,
and the share of weights that moved at all. bf16 has 8 significant bits: an Adam step of
about the learning rate (1e-5) on a weight of ~0.02 is below half its resolution and
rounds away unless an fp32 copy accumulates the steps.

    python benchmarks/bench_precision.py [--steps 40] [--lr 1e-5] [--device cpu|cuda]

The model is the test fixture (core.demo.build, size "fixture": a ~70k-parameter Llama that
knows 200 facts), built into a temporary directory (about 20 s on 2 cores), unless
--model-dir names a build (a directory with model/ and data/).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.demo.build import build_model
from core.engine.data import build_examples, load_records
from core.engine.modeling import AdapterSpec, load_base, wrap
from core.engine.spec.methods import METHODS, parse_params
from core.engine.train import run_unlearning

RUNS = (
    ("fp32", torch.float32, True),
    ("bf16, fp32 master weights (default)", torch.bfloat16, True),
    ("bf16, no master weights", torch.bfloat16, False),
)


def update(
    build: Path,
    device: torch.device,
    dtype: torch.dtype,
    master_weights: bool,
    steps: int,
    lr: float,
) -> torch.Tensor:
    model, tokenizer = load_base(build / "model", device, dtype)
    params = parse_params(
        "catnip",
        {
            "max_steps": steps,
            "batch_size": 16,
            "learning_rate": lr,
            "max_length": 64,
            "master_weights": master_weights,
        },
    )
    wrapped = wrap(model, AdapterSpec(type="full"), need_reference=False)
    forget = build_examples(load_records(build / "data" / "forget_qa.jsonl"), tokenizer, 64)
    before = {n: p.detach().float().clone() for n, p in wrapped.trainable().items()}
    run_unlearning(wrapped, METHODS["catnip"], params, forget, pad_id=tokenizer.pad_token_id)
    return torch.cat(
        [(p.detach().float() - before[n]).flatten() for n, p in wrapped.trainable().items()]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--model-dir", type=Path, help="a fixture build to use instead of a fresh one"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        build = args.model_dir or Path(tmp)
        if args.model_dir is None:
            build_model(build, "fixture", seed=0)
        device = torch.device(args.device)
        updates = {
            name: update(build, device, dtype, masters, args.steps, args.lr)
            for name, dtype, masters in RUNS
        }
    reference = updates["fp32"]
    print(f"full-weight CATNIP, {args.steps} steps at lr {args.lr:g}, batch 16, on {args.device}\n")
    print("| run | update size vs fp32 | cosine with the fp32 update | weights moved |")
    print("|---|---:|---:|---:|")
    for name, delta in updates.items():
        cosine = torch.nn.functional.cosine_similarity(delta, reference, dim=0)
        print(
            f"| {name} | {delta.norm() / reference.norm():.2f} | {cosine:.3f} | "
            f"{(delta != 0).float().mean():.1%} |"
        )


if __name__ == "__main__":
    main()
