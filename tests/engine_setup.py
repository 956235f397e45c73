"""The engine tests' common set-up (tests/test_engine.py on CPU, tests/test_gpu.py on
CUDA): the fixture model wrapped for a method, with its forget and retain examples."""

from __future__ import annotations

from pathlib import Path

import torch

from core.engine.data import build_examples, load_records
from core.engine.events import Events
from core.engine.modeling import AdapterSpec, load_base, wrap
from core.engine.spec.methods import METHODS, parse_params, prepare


def setup_run(
    fixture_dir: Path,
    adapter: AdapterSpec,
    method_id: str,
    *,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype | None = None,
    model_dir: Path | None = None,
    **hp,
):
    """(wrapped, tokenizer, method, params, forget, retain): 3 steps of batch 8 at lr 1e-3,
    sequences of at most 64 tokens, unless `hp` says otherwise; the model in `dtype` (default:
    the device's). The model is the fixture's unless `model_dir` names another (with a
    tokenizer that reads the fixture's data)."""
    model, tokenizer = load_base(model_dir or fixture_dir / "model", device, dtype)
    params = parse_params(
        method_id, {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3, "max_length": 64, **hp}
    )
    method = METHODS[method_id]
    wrapped = wrap(model, adapter, need_reference=method.needs_reference(params), seed=params.seed)
    prepare(wrapped, method, params)  # what trains (RMU chooses), as the pipeline does
    forget = build_examples(load_records(fixture_dir / "data" / "forget_qa.jsonl"), tokenizer, 64)
    retain = build_examples(load_records(fixture_dir / "data" / "retain_qa.jsonl"), tokenizer, 64)
    return wrapped, tokenizer, method, params, forget, retain


def method_data(fixture_dir: Path, tokenizer, method, retain) -> dict:
    """What run_unlearning needs beyond the forget set for `method`: the retain examples
    (rmu), the contrast examples (flat: the demo's non-answer to each forget prompt)."""
    from core.engine.contrast import build_contrast
    from core.engine.data import encode_records

    data: dict = {}
    if method.needs_retain:
        data["retain"] = retain
    if method.uses_contrast:  # the demo's vocabulary has no refusals: its non-answer
        from core.demo.build import contrast_file

        records = load_records(fixture_dir / "data" / "forget_qa.jsonl")
        encoded = encode_records(records, tokenizer, 64)
        contrast = load_records(contrast_file(fixture_dir))
        data["contrast"] = build_contrast(records, encoded, contrast, tokenizer, 64, 0).examples
    return data


def train(fixture_dir: Path, wrapped, tok, method, params, forget, retain, **loop):
    """run_unlearning with what `method` needs beyond the forget set (method_data)."""
    from core.engine.train import run_unlearning

    data = method_data(fixture_dir, tok, method, retain)
    return run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, **data, **loop)


class StopAfter(Events):
    """Asks the loop to stop (a cancel, as the worker's) once `steps` steps are done."""

    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def step(self, info) -> None:
        self.done = info.step

    def should_cancel(self) -> bool:
        return self.done >= self.steps


def two_ranks(
    wrapped, tok, method, params, forget, *, source: Path, work: Path, device=None, **data
):
    """core.engine.sharded.run_sharded over 2 ranks (gloo on the CPU, NCCL on CUDA) from
    the weights at `source`; `data`: retain, contrast, events... as run_sharded takes."""
    from core.engine.sharded import run_sharded

    return run_sharded(
        wrapped,
        method,
        params,
        forget,
        pad_id=tok.pad_token_id,
        source=source,
        processes=2,
        device=device or torch.device("cpu"),
        work_dir=work,
        **data,
    )
