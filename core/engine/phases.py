"""The phases of a job after core.engine.job.open_job, in the order PHASES runs them:
evaluate before -> unlearn -> distil (with robustify) -> evaluate after -> audit (attacks, membership inference,
the reference model, the verdict) -> save artifacts and report.

Each phase reads and adds to one JobContext; a new phase is one function here and its
name in PHASES. The audit phases do nothing for a job without eval data.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.engine import report
from core.engine.evaluation import evaluate, strip_per_record, tradeoff
from core.engine.evaluation.evidence import (
    judge,
    privacy_audit,
    reference_attacks,
    robustness_audits,
    with_privleak,
)
from core.engine.evaluation.summary import forget_standing
from core.engine.events import Phase
from core.engine.job import JobContext
from core.engine.modeling import load_base, peak_memory, save_output
from core.engine.robust.stage import run_distillation
from core.engine.sequential import chain_of, stack_adapters
from core.engine.sharded import run_sharded
from core.engine.spec import JobSpec
from core.engine.stop_rule import StopRule, probe_every
from core.engine.train import LoopResult, run_unlearning

TOKEN_VIEW_RECORDS = 8  # forget records whose token probabilities the report shows


def _forget_scores(evaluation: dict[str, Any]) -> list[float] | None:
    """The per-question forget KnowMem F1 of an evaluation, for the attacks' recovery on
    exactly the questions they measure."""
    return evaluation.get("forget_knowmem", {}).get("per_sample_f1")


def _job_metrics(ctx: JobContext) -> dict[str, Any]:
    """What the job is: method, hyperparameters, adapter, its data and its chain."""
    spec = ctx.spec
    metrics: dict[str, Any] = {
        "method": spec.method,
        "hyperparameters": spec.hyperparameters.model_dump(),
        "adapter": spec.adapter.model_dump(),
        "data": {name: its.summary() for name, its in ctx.encoded.items()},
    }
    if ctx.contrast is not None:
        metrics["data"]["contrast"] = ctx.contrast.summary()
    if ctx.start is not None:
        chain = ctx.options.chain
        metrics["chain"] = chain if chain is not None else chain_of(ctx.start)
    return metrics


def before_phase(ctx: JobContext) -> None:
    """The metrics' start, the token view before, whether the stop rule runs, and the
    before evaluation and membership inference."""
    spec, events = ctx.spec, ctx.events
    ctx.metrics = _job_metrics(ctx)
    ctx.token_view["before"] = report.token_probabilities(
        ctx.wrapped.model, ctx.tokenizer, ctx.forget[:TOKEN_VIEW_RECORDS]
    )
    every = probe_every(spec.eval, ctx.steps)
    if every and ctx.sharded is not None:
        events.warning(
            f"the stop rule does not run in a job sharded over {ctx.sharded} devices: it "
            f"trains all {ctx.steps} steps, and the before/after evaluation measures the last"
        )
        every = None
    ctx.probe_every = every
    ctx.unwatched_from = spec.eval.probe_samples if every and spec.eval else None
    if spec.eval is not None:
        events.phase(Phase.EVALUATING_BEFORE)
        evaluation = evaluate(
            ctx.wrapped.model,
            ctx.tokenizer,
            spec.eval,
            keep_samples=5,
            unwatched_from=ctx.unwatched_from,
        )
        ctx.metrics["before"] = strip_per_record(evaluation)
        ctx.before_scores = _forget_scores(evaluation)
        ctx.clock.lap("evaluate_before")
        ctx.privacy["before"] = privacy_audit(
            ctx.wrapped.model,
            ctx.tokenizer,
            spec.eval,
            ctx.forget_records,
            max_length=ctx.max_length,
        )
    ctx.clock.lap("privacy_before")


def _sharded_source(ctx: JobContext, work: Path) -> Path:
    """The weights a sharded job's ranks start from: the base model's directory, a
    previous full-weight job's, or (after a LoRA job, merged into the base here) a copy
    written for them."""
    if ctx.start is None:
        return Path(ctx.spec.base_model)
    if ctx.start.kind == "model":
        return ctx.start.path
    ctx.wrapped.model.save_pretrained(work / "start")
    return work / "start"


def _train_sharded(ctx: JobContext, processes: int, data: dict[str, Any]) -> LoopResult:
    """The unlearning loop over `processes` ranks, with what the metrics say of them."""
    with tempfile.TemporaryDirectory(prefix="unlearn-sharded-") as work:
        loop = run_sharded(
            ctx.wrapped,
            ctx.method,
            ctx.params,
            ctx.forget,
            source=_sharded_source(ctx, Path(work)),
            processes=processes,
            device=ctx.device,
            work_dir=Path(work) / "run",
            **data,
        )
    ctx.metrics["sharded"] = {
        "processes": processes,
        "backend": "nccl" if ctx.device.type == "cuda" else "gloo",
        "ranks_peak_memory": loop.ranks_peak_memory,
    }
    return loop


def unlearn_phase(ctx: JobContext) -> None:
    """The unlearning loop (sharded over ranks, or on one device with the stop rule
    where it runs), and what the stop rule decided."""
    spec, every, tokenizer = ctx.spec, ctx.probe_every, ctx.tokenizer
    stop_rule = (
        StopRule(ctx.wrapped, tokenizer, spec.eval, every, ctx.events)
        if every and spec.eval
        else None
    )
    ctx.events.phase(Phase.UNLEARNING, f"{ctx.steps} steps")
    data = {
        "pad_id": tokenizer.pad_token_id,
        "retain": ctx.retain,
        "contrast": ctx.contrast_examples,
        "contrast_paired": ctx.contrast.paired if ctx.contrast is not None else True,
        "checkpoint_dir": ctx.options.checkpoint_dir,
        "fingerprint": ctx.fingerprint,
        "events": ctx.events,
    }
    if ctx.sharded is not None:
        loop = _train_sharded(ctx, ctx.sharded, data)
    else:
        loop = run_unlearning(
            ctx.wrapped, ctx.method, ctx.params, ctx.forget, stop_rule=stop_rule, **data
        )
    if stop_rule is not None:
        ctx.metrics["stop_rule"] = {
            **stop_rule.finish(loop.steps_done),
            "stopped_early": loop.stopped_early,
            "reason": loop.stop_reason,
            "every": every,
        }
    ctx.loop = loop
    ctx.clock.lap("unlearn")


def distill_phase(ctx: JobContext) -> None:
    """With spec.robustify: the unlearned model distilled into a shrunk-and-perturbed
    copy of itself (core.engine.robust.stage); the student, full weights, becomes the
    job's model (its reference copy goes with the old one)."""
    if ctx.spec.robustify is None:
        return
    ctx.wrapped, ctx.metrics["robustify"] = run_distillation(
        ctx.wrapped, ctx.tokenizer, ctx.spec, ctx.max_length, ctx.events
    )
    ctx.clock.lap("distill")


def after_phase(ctx: JobContext) -> None:
    """The token view after, and the after evaluation with the trade-off; its
    per-record values stay on the context for the audits."""
    spec = ctx.spec
    ctx.token_view["after"] = report.token_probabilities(
        ctx.wrapped.model, ctx.tokenizer, ctx.forget[:TOKEN_VIEW_RECORDS]
    )
    if spec.eval is not None:
        ctx.events.phase(Phase.EVALUATING_AFTER)
        ctx.after_evaluation = evaluate(
            ctx.wrapped.model,
            ctx.tokenizer,
            spec.eval,
            keep_samples=5,
            unwatched_from=ctx.unwatched_from,
        )
        ctx.metrics["after"] = strip_per_record(ctx.after_evaluation)
        ctx.after_scores = _forget_scores(ctx.after_evaluation)
        ctx.metrics["tradeoff"] = tradeoff(ctx.metrics["before"], ctx.metrics["after"])
    ctx.clock.lap("evaluate_after")


def attacks_phase(ctx: JobContext) -> None:
    """The robustness audits (relearning, quantization, in-context extraction)."""
    if ctx.spec.eval is None:
        return
    ctx.events.phase(Phase.AUDITING)
    ctx.metrics["robustness"] = robustness_audits(
        ctx.wrapped,
        ctx.tokenizer,
        ctx.spec.eval,
        before_scores=ctx.before_scores,
        after_scores=ctx.after_scores,
        after_evaluation=ctx.after_evaluation,
        max_length=ctx.max_length,
    )
    ctx.clock.lap("audit_attacks")


def privacy_phase(ctx: JobContext) -> None:
    """Membership inference on the unlearned model."""
    if ctx.spec.eval is None:
        return
    ctx.privacy["after"] = privacy_audit(
        ctx.wrapped.model,
        ctx.tokenizer,
        ctx.spec.eval,
        ctx.forget_records,
        max_length=ctx.max_length,
    )
    ctx.clock.lap("audit_privacy")


def reference_phase(ctx: JobContext) -> None:
    """The reference model's evaluation and membership inference, where eval names one
    (read only: from the model cache where there is one)."""
    ev = ctx.spec.eval
    if ev is None:
        return
    if ev.reference_model is not None:
        models = ctx.options.models
        reference, _ = (
            models.load(ev.reference_model, ctx.device, shared=True)  # read only
            if models
            else load_base(ev.reference_model, ctx.device)
        )
        ctx.metrics["reference"] = strip_per_record(
            evaluate(reference, ctx.tokenizer, ev, unwatched_from=ctx.unwatched_from)
        )
        ctx.privacy["reference"] = privacy_audit(
            reference, ctx.tokenizer, ev, ctx.forget_records, max_length=ctx.max_length
        )
        # the same relearning cells on the reference: the control for injection
        reference_attacks(
            reference, ctx.tokenizer, ev, ctx.metrics.get("robustness"), max_length=ctx.max_length
        )
        del reference
    ctx.clock.lap("audit_reference")


def verdict_phase(ctx: JobContext) -> None:
    """The membership inference figures with PrivLeak against the reference, every
    forget metric against before and the reference (`forget_standing`), and the
    declared criteria with the verdict."""
    if ctx.spec.eval is None:
        return
    ctx.metrics["privacy"] = with_privleak(ctx.privacy)
    ctx.metrics["forget_standing"] = forget_standing(ctx.metrics)
    ctx.metrics["verdict"], ctx.metrics["criteria"] = judge(ctx.spec.eval.criteria, ctx.metrics)


def write_provenance(
    directory: Path, spec: JobSpec, metrics: dict[str, Any], shown: dict[str, str]
) -> None:
    """provenance.json beside the weights: what made them (job, base model as its readers
    know it, method, adapter, chain) and what was measured (the trade-off, the verdict,
    the steps), so weights that travel alone still say where they came from."""
    provenance = {
        "job": shown.get("job"),
        "base_model": {
            "name": shown.get("base_model", spec.base_model),
            "digest": shown.get("base_model_digest"),
        },
        "method": spec.method,
        "adapter": spec.adapter.model_dump(),
        "chain": [link["job"] for link in metrics.get("chain", [])],
        "steps": metrics.get("steps"),
        "tradeoff": metrics.get("tradeoff"),
        "verdict": metrics.get("verdict"),
        "report": "the job's report artifact (summary.md, metrics.json)",
    }
    (directory / "provenance.json").write_text(json.dumps(provenance, indent=2))


def _run_figures(ctx: JobContext, loop: LoopResult) -> None:
    """Steps, timings, the model cache's load and the throughput, into the metrics."""
    timings = ctx.clock.laps
    ctx.metrics["steps"] = {"done": loop.steps_done, "planned": loop.total_steps}
    ctx.metrics["timings_s"] = timings  # the same dict: the save lap lands in it later
    if ctx.base_load is not None:
        ctx.metrics["model_cache"] = ctx.base_load  # hit, miss or off, and the load's seconds
    run_steps = len(loop.history)  # this attempt's steps (a resumed job did the rest before)
    ctx.metrics["throughput"] = {
        "device": ctx.device.type,
        "steps_per_second": round(run_steps / timings["unlearn"], 4)
        if timings["unlearn"]
        else None,
        "tokens_per_second": round(loop.history[-1].tokens_per_second, 1) if run_steps else None,
        "peak_memory": peak_memory(ctx.device),
    }


def save_phase(ctx: JobContext) -> None:
    """The weights (a sequential LoRA job's adapter stacked on its start's), the report,
    provenance.json beside the weights and metrics.json, under output_dir."""
    spec, shown, output_dir = ctx.spec, ctx.options.shown, ctx.output_dir
    loop = ctx.trained()
    ctx.events.phase(Phase.SAVING)
    output_dir.mkdir(parents=True, exist_ok=True)
    artifacts = save_output(
        ctx.wrapped, ctx.tokenizer, output_dir, base_name=shown.get("base_model")
    )
    if ctx.start is not None and ctx.start.kind == "adapter" and "adapter" in artifacts:
        # the adapter trained on the previous job's merged model, stacked with that job's
        # adapter: one adapter for the chain, on the base model
        stack_adapters(ctx.start.path, artifacts["adapter"], artifacts["adapter"])
    _run_figures(ctx, loop)
    report_dir = report.write_report(
        output_dir / "report",
        spec=spec,
        metrics=ctx.metrics,
        history=loop.history,
        token_view=ctx.token_view,
        shown=shown,
    )
    for name in ("adapter", "model"):
        if name in artifacts:
            write_provenance(artifacts[name], spec, ctx.metrics, shown)
    artifacts["report"] = report_dir
    (output_dir / "metrics.json").write_text(json.dumps(ctx.metrics, indent=2))
    ctx.artifacts = artifacts
    ctx.clock.lap("save")


PHASES: tuple[Callable[[JobContext], None], ...] = (
    before_phase,
    unlearn_phase,
    distill_phase,  # only with spec.robustify
    after_phase,
    attacks_phase,
    privacy_phase,
    reference_phase,
    verdict_phase,
    save_phase,
)
