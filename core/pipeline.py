"""One job, start to finish: validate -> load -> evaluate before -> unlearn ->
evaluate after -> save artifacts -> report.

The same function runs under `unlearn run` (a tqdm reporter) and under a Celery
worker (a reporter that writes events to the database). `python -m core run SPEC`
reproduces any job from its spec.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core import losses, report
from core.data import encode_records, load_records
from core.errors import DataError, DeviceError
from core.evaluation import EvalSpec, evaluate, knowmem, tradeoff
from core.formats import check_file
from core.methods import get_method
from core.modeling import Wrapped, fit_max_length, load_base, pick_device, save_output, wrap
from core.spec import JobSpec
from core.spec_parts import EVAL_FILE_KINDS, TRAIN_FILE_KINDS
from core.unlearn import (
    Hooks,
    LoopResult,
    StepInfo,
    ensure_resumable,
    run_fingerprint,
    run_unlearning,
    total_steps,
)

log = logging.getLogger(__name__)


class Reporter:
    """What a job tells the outside world. The base class reports nothing."""

    def phase(self, name: str, detail: str | None = None) -> None:
        """Phase changes: validating, loading, evaluating_before, unlearning, ..."""

    def step(self, info: StepInfo) -> None:
        """After every optimizer step."""

    def probe(self, step: int, result: dict[str, float]) -> None:
        """Stop-rule probe results."""

    def warning(self, message: str) -> None:
        """Something the user should know that does not stop the job (records that
        max_length cut or left out)."""

    def resumed(self, step: int) -> None:
        """The loop continued from a checkpoint at `step`."""

    def checkpoint(self, path: Path) -> None:
        """A checkpoint was written at `path`."""

    def should_cancel(self) -> bool:
        return False


@dataclass
class JobResult:
    output_dir: Path
    artifacts: dict[str, Path]
    metrics: dict[str, Any]
    loop: LoopResult
    seconds: dict[str, float] = field(default_factory=dict)


class StopRule:
    """Evaluate small probes every K steps; stop at the forget target or before the
    utility budget is spent, and keep the best state within budget.

    Forget probe: KnowMem F1 on the first N forget questions; utility probe: KnowMem F1
    on the first N retain questions. "Best" = lowest forget score with utility
    >= (1 - budget) * utility before.
    """

    def __init__(self, wrapped: Wrapped, tokenizer: Any, spec: EvalSpec, every: int,
                 reporter: Reporter):
        self.wrapped, self.tokenizer, self.spec, self.every = wrapped, tokenizer, spec, every
        self.reporter = reporter
        files = spec.files()
        self.forget = load_records(files["forget_qa"]).items[: spec.probe_samples]
        self.retain = load_records(files["retain_qa"]).items[: spec.probe_samples]
        self.history: list[dict[str, float]] = []
        self.before = self.measure()
        # The initial state is always within budget: if the first probe already breaks it,
        # the job ends with the model unchanged rather than collapsed.
        self.best: dict[str, float] = {"step": 0, **self.before}
        self.best_state = self._snapshot()
        self.last_probed = 0

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Trainable weights, on the CPU (a LoRA adapter is small; full weights are not)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.wrapped.trainable().items()}

    def measure(self) -> dict[str, float]:
        model = self.wrapped.model
        f = knowmem(model, self.tokenizer, self.forget, max_new_tokens=self.spec.max_new_tokens,
                    batch_size=self.spec.batch_size)["rouge_l_f1"]
        u = knowmem(model, self.tokenizer, self.retain, max_new_tokens=self.spec.max_new_tokens,
                    batch_size=self.spec.batch_size)["rouge_l_f1"]
        return {"forget": f, "utility": u}

    def check(self, step: int) -> str | None:
        if step % self.every:
            return None
        return self._probe(step)

    def _probe(self, step: int) -> str | None:
        self.last_probed = step
        now = self.measure()
        record = {"step": step, **now}
        self.history.append(record)
        self.reporter.probe(step, record)
        floor = (1 - self.spec.utility_budget) * self.before["utility"]
        if now["utility"] < floor:
            return (f"utility {now['utility']:.3f} fell below the budget floor {floor:.3f} "
                    f"at step {step}")
        if now["forget"] < self.best["forget"]:
            self.best = record
            self.best_state = self._snapshot()
        if now["forget"] <= self.spec.forget_target * self.before["forget"]:
            return f"forget target reached at step {step}"
        return None

    # The rule's state travels with each checkpoint, so a job resumed after a kill keeps
    # the best state found before it. Without it, a job killed after the rule stopped it
    # (while evaluating or uploading) resumed at its end and restored the initial model.
    STATE, BEST = "stop_rule.json", "stop_rule_best.safetensors"

    def save(self, directory: Path) -> None:
        """Write the probes so far and the best state into a checkpoint being made (the
        best weights only when the best is not the initial state, which a resumed job
        has before its checkpoint is loaded)."""
        state = {"before": self.before, "history": self.history, "best": self.best,
                 "last_probed": self.last_probed}
        (directory / self.STATE).write_text(json.dumps(state))
        if self.best["step"] != 0:
            save_file({n: t.contiguous() for n, t in self.best_state.items()}, directory / self.BEST)

    def load(self, directory: Path) -> None:
        """Take up the state a checkpoint holds (none in checkpoints of before it did)."""
        if not (directory / self.STATE).is_file():
            return
        state = json.loads((directory / self.STATE).read_text())
        self.before, self.history, self.best = state["before"], state["history"], state["best"]
        self.last_probed = state["last_probed"]
        if self.best["step"] != 0:
            self.best_state = load_file(directory / self.BEST)

    def finish(self, final_step: int) -> dict[str, Any]:
        """Probe the final state if needed, then restore the best state within budget."""
        if self.last_probed != final_step:
            self._probe(final_step)
        restored = None
        if self.best["step"] != final_step:
            trainable = self.wrapped.trainable()
            with torch.no_grad():
                for name, tensor in self.best_state.items():
                    trainable[name].copy_(tensor)
            restored = self.best["step"]
        return {"before": self.before, "history": self.history, "best": self.best,
                "restored_step": restored}


class _LoopHooks(Hooks):
    def __init__(self, reporter: Reporter, stop_rule: StopRule | None):
        self.reporter, self.stop_rule = reporter, stop_rule

    def on_step(self, info: StepInfo) -> None:
        self.reporter.step(info)

    def should_cancel(self) -> bool:
        return self.reporter.should_cancel()

    def after_step(self, step: int) -> str | None:
        return self.stop_rule.check(step) if self.stop_rule else None

    def on_resume(self, step: int, path: Path) -> None:
        if self.stop_rule is not None:
            self.stop_rule.load(path)
        self.reporter.resumed(step)

    def add_to_checkpoint(self, directory: Path) -> None:
        if self.stop_rule is not None:
            self.stop_rule.save(directory)

    def on_checkpoint(self, path: Path) -> None:
        self.reporter.checkpoint(path)


def _check_eval_files(ev: EvalSpec) -> None:
    """Every eval file exists, is valid and holds its slot's kind, before any model is
    loaded (a QA file given as forget_mc failed inside lm-eval, after the load)."""
    for name, path in ev.files().items():
        try:
            check_file(path, allowed_kinds=EVAL_FILE_KINDS[name])
        except DataError as exc:
            raise DataError(f"eval.{name}: {exc.message}", param=f"eval.{name}") from None


def _probe_every(spec: JobSpec, steps: int) -> int | None:
    """The stop rule is on when eval data has forget and retain questions (every ~5% of
    the run unless probe_every says otherwise); off without eval data."""
    ev = spec.eval
    if ev is None or not (ev.forget_qa and ev.retain_qa):
        return None
    return ev.probe_every or max(1, steps // 20)


def run_job(spec: JobSpec, output_dir: Path, *, reporter: Reporter | None = None,
            device: str | None = None, checkpoint_dir: Path | None = None,
            shown: dict[str, str] | None = None) -> JobResult:
    """Run one job; file paths in `spec` are local. Writes artifacts under output_dir.
    `shown` names the base model and forget file in the report as its readers know them
    (the service's tenants see neither the operator's nor the worker's paths)."""
    reporter = reporter or Reporter()
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 3)
        clock = now

    # --- validate
    reporter.phase("validating")
    method = get_method(spec.method)
    params = spec.hyperparameters
    forget_records = load_records(spec.forget_file, allowed_kinds=TRAIN_FILE_KINDS)
    retain_records = (load_records(spec.retain_file, allowed_kinds=TRAIN_FILE_KINDS)
                      if spec.retain_file else None)
    if spec.eval is not None:
        _check_eval_files(spec.eval)
    lap("validate")

    # --- load
    reporter.phase("loading")
    torch_device = pick_device(device)
    try:
        losses.check_device(torch_device)
    except ValueError as exc:  # LOSS_BACKEND=triton on a CPU worker: refused before loading
        raise DeviceError(f"{exc}; use the auto loss backend", param="loss_backend") from None
    model, tokenizer = load_base(spec.base_model, torch_device)
    max_length, length_warning = fit_max_length(model, params.max_length)
    encoded = {"forget": encode_records(forget_records, tokenizer, max_length,
                                        eos_target=params.forget_eos)}
    if retain_records:
        encoded["retain"] = encode_records(retain_records, tokenizer, max_length)
    warnings = [length_warning] + [its.warning(role) for role, its in encoded.items()]
    for warning in filter(None, warnings):
        reporter.warning(warning)
    forget = encoded["forget"].examples
    retain = encoded["retain"].examples if retain_records else None
    wrapped = wrap(model, spec.adapter, need_reference=method.needs_reference(params),
                   seed=params.seed)
    fingerprint = run_fingerprint(method, params, wrapped, forget, retain) if checkpoint_dir else None
    if fingerprint is not None:  # another run's checkpoint: refused before the evaluation
        ensure_resumable(checkpoint_dir, fingerprint)
    lap("load")

    # --- evaluate before
    metrics: dict[str, Any] = {"method": spec.method, "hyperparameters": params.model_dump(),
                               "adapter": spec.adapter.model_dump(),
                               "data": {name: its.summary()
                                        for name, its in encoded.items()}}
    samples = min(8, len(forget))
    token_view_before = report.token_probabilities(wrapped.model, tokenizer, forget[:samples])
    steps = total_steps(params, len(forget))
    every = _probe_every(spec, steps)
    unwatched_from = spec.eval.probe_samples if every and spec.eval else None
    if spec.eval is not None:
        reporter.phase("evaluating_before")
        metrics["before"] = evaluate(wrapped.model, tokenizer, spec.eval, keep_samples=5,
                                     unwatched_from=unwatched_from)
    lap("evaluate_before")

    # --- unlearn
    stop_rule = StopRule(wrapped, tokenizer, spec.eval, every, reporter) if every and spec.eval else None
    reporter.phase("unlearning", f"{steps} steps")
    loop = run_unlearning(wrapped, method, params, forget, pad_id=tokenizer.pad_token_id,
                          retain=retain, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                          hooks=_LoopHooks(reporter, stop_rule))
    if stop_rule is not None:
        metrics["stop_rule"] = {**stop_rule.finish(loop.steps_done),
                                "stopped_early": loop.stopped_early, "reason": loop.stop_reason,
                                "every": every}
    lap("unlearn")

    # --- evaluate after
    token_view_after = report.token_probabilities(wrapped.model, tokenizer, forget[:samples])
    if spec.eval is not None:
        reporter.phase("evaluating_after")
        metrics["after"] = evaluate(wrapped.model, tokenizer, spec.eval, keep_samples=5,
                                    unwatched_from=unwatched_from)
        metrics["tradeoff"] = tradeoff(metrics["before"], metrics["after"])
    lap("evaluate_after")

    # --- save artifacts and report
    reporter.phase("saving")
    output_dir.mkdir(parents=True, exist_ok=True)
    artifacts = save_output(wrapped, tokenizer, output_dir)
    metrics["steps"] = {"done": loop.steps_done, "planned": loop.total_steps}
    metrics["timings_s"] = timings
    report_dir = report.write_report(
        output_dir / "report", spec=spec, metrics=metrics, history=loop.history,
        token_view={"before": token_view_before, "after": token_view_after}, shown=shown)
    artifacts["report"] = report_dir
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lap("save")
    return JobResult(output_dir, artifacts, metrics, loop, timings)
