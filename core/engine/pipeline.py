"""One job, start to finish: validate -> load -> evaluate before -> unlearn ->
evaluate after -> audit (attacks, membership inference, a reference model, criteria
and the verdict) -> save artifacts -> report.

The same function runs under `unlearn run` (progress bars) and under a Celery worker
(events written to the database): both report through core.engine.events. `python -m core run SPEC`
reproduces any job from its spec.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.engine import losses, report
from core.engine.checkpoint import ensure_resumable, run_fingerprint
from core.engine.contrast import build_contrast
from core.engine.contrast import contrast_records as contrast_set_records
from core.engine.data import encode_records, load_records
from core.engine.evaluation import EvalSpec, evaluate, strip_per_record, tradeoff
from core.engine.events import Events, Phase
from core.engine.evidence import judge, privacy_audit, robustness_audits, with_privleak
from core.engine.formats import check_file
from core.engine.methods import MAX_STEPS, TrainingParams, get_method, prepare
from core.engine.model_cache import ModelCache
from core.engine.modeling import (
    check_quantization,
    fit_max_length,
    load_base,
    peak_memory,
    pick_device,
    reset_peak_memory,
    save_output,
    wrap,
)
from core.engine.sequential import (
    StartPoint,
    chain_of,
    check_same_architecture,
    merge_start,
    stack_adapters,
    start_digest,
    start_point,
)
from core.engine.sharded import check_devices, run_sharded
from core.engine.spec import JobSpec
from core.engine.spec_parts import EVAL_FILE_KINDS, TRAIN_FILE_KINDS
from core.engine.stop_rule import StopRule, probe_every
from core.engine.train import LoopResult, run_unlearning, total_steps
from core.errors import DataError, DeviceError, SpecError

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    output_dir: Path
    artifacts: dict[str, Path]
    metrics: dict[str, Any]
    loop: LoopResult
    seconds: dict[str, float] = field(default_factory=dict)


def _check_eval_files(ev: EvalSpec, forget_kind: str) -> None:
    """Every eval file exists, is valid and holds its slot's kind, before any model is
    loaded (a QA file given as forget_mc failed inside lm-eval, after the load); the
    holdout holds records of the forget set's kind (non-members of the same sort)."""
    for name, path in ev.files().items():
        try:
            kind = check_file(path, allowed_kinds=EVAL_FILE_KINDS[name])
        except DataError as exc:
            raise DataError(f"eval.{name}: {exc.message}", param=f"eval.{name}") from None
        if name == "holdout" and kind != forget_kind:
            raise DataError(
                f"eval.holdout holds {kind} records; the forget set holds {forget_kind}: "
                "membership inference compares records of one kind",
                param="eval.holdout",
            )
    if ev.reference_model is not None and not (Path(ev.reference_model) / "config.json").is_file():
        raise DataError(
            f"eval.reference_model: {ev.reference_model} is not a Hugging Face model "
            "directory (no config.json)",
            param="eval.reference_model",
        )


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


def _start_identity(start: StartPoint | None, chain: list[dict[str, Any]] | None) -> str | None:
    """What names the weights a sequential job starts from, for its checkpoint fingerprint:
    the sha256 the service checked its download against (the chain's last link), else a
    digest of the local files (`unlearn run`)."""
    if start is None:
        return None
    known = chain[-1].get("sha256") if chain else None
    return str(known) if known else start_digest(start)


def _load_start(
    spec: JobSpec, start: StartPoint | None, device: Any, models: ModelCache | None
) -> tuple[Any, Any]:
    """(model, tokenizer) a job starts from: the base model (from the worker's warm cache
    where it has one); after a previous LoRA job, with that job's adapter merged in;
    after a full-weight job, that job's weights."""
    if start is not None and start.kind == "model":
        return load_base(start.path, device)
    if models is None:
        model, tokenizer = load_base(spec.base_model, device)
    else:
        # A LoRA job never writes its base (peft freezes it; merges are into copies), so
        # it may share the cached weights; a merged start or full weights may not.
        shared = spec.adapter.type == "lora" and start is None
        model, tokenizer = models.load(spec.base_model, device, shared=shared)
    if start is not None:
        model = merge_start(model, start)
    return model, tokenizer


def _sharded_source(spec: JobSpec, start: StartPoint | None, wrapped: Any, work: Path) -> Path:
    """The weights a sharded job's ranks start from: the base model's directory, a
    previous full-weight job's, or (after a LoRA job, merged into the base here) a copy
    written for them."""
    if start is None:
        return Path(spec.base_model)
    if start.kind == "model":
        return start.path
    wrapped.model.save_pretrained(work / "start")
    return work / "start"


def _forget_scores(evaluation: dict[str, Any]) -> list[float] | None:
    """The per-question forget KnowMem F1 of an evaluation, for the attacks' recovery on
    exactly the questions they measure."""
    return evaluation.get("forget_knowmem", {}).get("per_sample_f1")


def _check_length(
    params: TrainingParams, examples: int, max_length: int, max_tokens: int | None
) -> int:
    """The run's steps; SpecError past MAX_STEPS, or past `max_tokens` tokens trained on."""
    steps = total_steps(params, examples)
    if steps > MAX_STEPS:
        raise SpecError(
            f"hyperparameters.epochs: {params.epochs} epochs over {examples} sequences in batches "
            f"of {params.batch_size} make {steps} steps; the limit is {MAX_STEPS}: lower epochs or "
            "set max_steps",
            param="hyperparameters.epochs",
            code="job_too_large",
        )
    tokens = steps * params.batch_size * params.gradient_accumulation_steps * max_length
    if max_tokens is not None and tokens > max_tokens:
        raise SpecError(
            f"the job would train on up to {tokens:,} tokens ({steps} steps over {examples} "
            f"sequences); the limit per job is {max_tokens:,}: lower max_steps, epochs, "
            "batch_size or max_length",
            param="hyperparameters",
            code="job_too_large",
        )
    return steps


def run_job(
    spec: JobSpec,
    output_dir: Path,
    *,
    events: Events | None = None,
    device: str | None = None,
    checkpoint_dir: Path | None = None,
    shown: dict[str, str] | None = None,
    max_tokens: int | None = None,
    chain: list[dict[str, Any]] | None = None,
    models: ModelCache | None = None,
) -> JobResult:
    """Run one job; file paths in `spec` are local. Writes artifacts under output_dir.
    `shown` names the base model and forget file in the report as its readers know them
    (the service's tenants see neither the operator's nor the worker's paths).
    `max_tokens` bounds steps x batch x accumulation x max_length, checked once the
    forget set is tokenized, before any evaluation (the service's per-job budget).
    `chain` names the jobs a sequential job follows, first job first (the service: by
    job id); by default, the chain its init_from_job directory records, then that
    directory. `models`: a warm cache of base models (a worker running job after job);
    each job gets its own copy, so none sees another's changes."""
    events = events or Events()
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 3)
        clock = now

    # --- validate
    events.phase(Phase.VALIDATING)
    method = get_method(spec.method)
    params = spec.hyperparameters
    forget_records = load_records(spec.forget_file, allowed_kinds=TRAIN_FILE_KINDS)
    retain_records = (
        load_records(spec.retain_file, allowed_kinds=TRAIN_FILE_KINDS) if spec.retain_file else None
    )
    contrast_records = None
    if spec.contrast_file:
        try:
            contrast_records = load_records(spec.contrast_file, allowed_kinds=TRAIN_FILE_KINDS)
        except DataError as exc:
            raise DataError(f"contrast_file: {exc.message}", param="contrast_file") from None
    if method.uses_contrast:  # its pairing with the forget set, checked before any load
        contrast_set_records(forget_records, contrast_records, params.seed)
    if spec.eval is not None:
        _check_eval_files(spec.eval, forget_records.kind)
    start = start_point(spec.init_from_job) if spec.init_from_job else None
    if start is not None and start.kind == "model":
        check_same_architecture(spec.base_model, start)
    lap("validate")

    # --- load
    events.phase(Phase.LOADING)
    torch_device = pick_device(device)
    reset_peak_memory(torch_device)
    try:
        losses.check_device(torch_device)
    except ValueError as exc:  # LOSS_BACKEND=triton on a CPU worker: refused before loading
        raise DeviceError(f"{exc}; use the auto loss backend", param="loss_backend") from None
    check_quantization(spec.adapter.quantize, torch_device)
    sharded = spec.resources.gpus if spec.resources.gpus > 1 else None
    if sharded is not None:
        check_devices(sharded, torch_device)
    if spec.adapter.quantize is not None and start is not None:
        raise SpecError(
            "init_from_job with adapter.quantize: the previous job's output is merged into "
            "the base model first, which a 4-bit base cannot take; drop adapter.quantize",
            param="adapter.quantize",
        )
    if spec.adapter.quantize is not None:  # QLoRA: its own 4-bit load, never the cache
        model, tokenizer = load_base(spec.base_model, torch_device, quantize=spec.adapter.quantize)
    else:
        model, tokenizer = _load_start(spec, start, torch_device, models)
    base_load = dict(models.last) if models is not None else None
    max_length, length_warning = fit_max_length(model, params.max_length)
    encoded = {
        "forget": encode_records(
            forget_records, tokenizer, max_length, eos_target=params.forget_eos
        )
    }
    if retain_records:
        encoded["retain"] = encode_records(retain_records, tokenizer, max_length)
    contrast = None
    if method.uses_contrast:
        contrast = build_contrast(
            forget_records, encoded["forget"], contrast_records, tokenizer, max_length, params.seed
        )
    warnings = [length_warning] + [its.warning(role) for role, its in encoded.items()]
    warnings.append(contrast.warning() if contrast is not None else None)
    for warning in filter(None, warnings):
        events.warning(warning)
    forget = encoded["forget"].examples
    retain = encoded["retain"].examples if retain_records else None
    steps = _check_length(params, len(forget), max_length, max_tokens)
    wrapped = wrap(
        model, spec.adapter, need_reference=method.needs_reference(params), seed=params.seed
    )
    prepare(wrapped, method, params)  # what trains, before the fingerprint names it
    contrast_examples = contrast.examples if contrast is not None else None
    fingerprint = (
        run_fingerprint(
            method,
            params,
            wrapped,
            forget,
            retain,
            contrast_examples,
            start=_start_identity(start, chain),
        )
        if checkpoint_dir
        else None
    )
    if fingerprint is not None:  # another run's checkpoint: refused before the evaluation
        ensure_resumable(checkpoint_dir, fingerprint, sharded=sharded is not None)
    lap("load")

    # --- evaluate before
    metrics: dict[str, Any] = {
        "method": spec.method,
        "hyperparameters": params.model_dump(),
        "adapter": spec.adapter.model_dump(),
        "data": {name: its.summary() for name, its in encoded.items()},
    }
    if contrast is not None:
        metrics["data"]["contrast"] = contrast.summary()
    if start is not None:
        metrics["chain"] = chain if chain is not None else chain_of(start)
    samples = min(8, len(forget))
    token_view_before = report.token_probabilities(wrapped.model, tokenizer, forget[:samples])
    every = probe_every(spec.eval, steps)
    if every and sharded is not None:
        events.warning(
            f"the stop rule does not run in a job sharded over {sharded} devices: it trains "
            f"all {steps} steps, and the before/after evaluation measures the last"
        )
        every = None
    unwatched_from = spec.eval.probe_samples if every and spec.eval else None
    before_scores = after_scores = privacy_before = None
    if spec.eval is not None:
        events.phase(Phase.EVALUATING_BEFORE)
        before_evaluation = evaluate(
            wrapped.model, tokenizer, spec.eval, keep_samples=5, unwatched_from=unwatched_from
        )
        metrics["before"] = strip_per_record(before_evaluation)
        before_scores = _forget_scores(before_evaluation)
        lap("evaluate_before")
        privacy_before = privacy_audit(
            wrapped.model, tokenizer, spec.eval, forget_records, max_length=max_length
        )
    lap("privacy_before")

    # --- unlearn
    stop_rule = (
        StopRule(wrapped, tokenizer, spec.eval, every, events) if every and spec.eval else None
    )
    events.phase(Phase.UNLEARNING, f"{steps} steps")
    data = {
        "pad_id": tokenizer.pad_token_id,
        "retain": retain,
        "contrast": contrast_examples,
        "contrast_paired": contrast.paired if contrast is not None else True,
        "checkpoint_dir": checkpoint_dir,
        "fingerprint": fingerprint,
        "events": events,
    }
    if sharded is not None:
        with tempfile.TemporaryDirectory(prefix="unlearn-sharded-") as work:
            loop = run_sharded(
                wrapped,
                method,
                params,
                forget,
                source=_sharded_source(spec, start, wrapped, Path(work)),
                processes=sharded,
                device=torch_device,
                work_dir=Path(work) / "run",
                **data,
            )
        metrics["sharded"] = {
            "processes": sharded,
            "backend": "nccl" if torch_device.type == "cuda" else "gloo",
            "ranks_peak_memory": loop.ranks_peak_memory,
        }
    else:
        loop = run_unlearning(wrapped, method, params, forget, stop_rule=stop_rule, **data)
    if stop_rule is not None:
        metrics["stop_rule"] = {
            **stop_rule.finish(loop.steps_done),
            "stopped_early": loop.stopped_early,
            "reason": loop.stop_reason,
            "every": every,
        }
    lap("unlearn")

    # --- evaluate after
    token_view_after = report.token_probabilities(wrapped.model, tokenizer, forget[:samples])
    if spec.eval is not None:
        events.phase(Phase.EVALUATING_AFTER)
        after_evaluation = evaluate(  # its per-record values serve the audits too
            wrapped.model, tokenizer, spec.eval, keep_samples=5, unwatched_from=unwatched_from
        )
        metrics["after"] = strip_per_record(after_evaluation)
        after_scores = _forget_scores(after_evaluation)
        metrics["tradeoff"] = tradeoff(metrics["before"], metrics["after"])
    lap("evaluate_after")

    # --- audit: attacks, membership inference, the reference model, criteria
    if spec.eval is not None:
        events.phase(Phase.AUDITING)
        metrics["robustness"] = robustness_audits(
            wrapped,
            tokenizer,
            spec.eval,
            before_scores=before_scores,
            after_scores=after_scores,
            after_evaluation=after_evaluation,
            max_length=max_length,
        )
        lap("audit_attacks")
        privacy = {
            "before": privacy_before,
            "after": privacy_audit(
                wrapped.model, tokenizer, spec.eval, forget_records, max_length=max_length
            ),
        }
        lap("audit_privacy")
        if spec.eval.reference_model is not None:
            reference, _ = (
                models.load(spec.eval.reference_model, torch_device, shared=True)  # read only
                if models
                else load_base(spec.eval.reference_model, torch_device)
            )
            metrics["reference"] = strip_per_record(
                evaluate(reference, tokenizer, spec.eval, unwatched_from=unwatched_from)
            )
            privacy["reference"] = privacy_audit(
                reference, tokenizer, spec.eval, forget_records, max_length=max_length
            )
            del reference
        lap("audit_reference")
        metrics["privacy"] = with_privleak(privacy)
        metrics["verdict"], metrics["criteria"] = judge(spec.eval.criteria, metrics)

    # --- save artifacts and report
    events.phase(Phase.SAVING)
    output_dir.mkdir(parents=True, exist_ok=True)
    shown = shown or {}
    artifacts = save_output(wrapped, tokenizer, output_dir, base_name=shown.get("base_model"))
    if start is not None and start.kind == "adapter" and "adapter" in artifacts:
        # the adapter trained on the previous job's merged model, stacked with that job's
        # adapter: one adapter for the chain, on the base model
        stack_adapters(start.path, artifacts["adapter"], artifacts["adapter"])
    metrics["steps"] = {"done": loop.steps_done, "planned": loop.total_steps}
    metrics["timings_s"] = timings
    if base_load is not None:
        metrics["model_cache"] = base_load  # hit, miss or off, and the load's seconds
    run_steps = len(loop.history)  # this attempt's steps (a resumed job did the rest before)
    metrics["throughput"] = {
        "device": torch_device.type,
        "steps_per_second": round(run_steps / timings["unlearn"], 4)
        if timings["unlearn"]
        else None,
        "tokens_per_second": round(loop.history[-1].tokens_per_second, 1) if run_steps else None,
        "peak_memory": peak_memory(torch_device),
    }
    report_dir = report.write_report(
        output_dir / "report",
        spec=spec,
        metrics=metrics,
        history=loop.history,
        token_view={"before": token_view_before, "after": token_view_after},
        shown=shown,
    )
    for name in ("adapter", "model"):
        if name in artifacts:
            write_provenance(artifacts[name], spec, metrics, shown)
    artifacts["report"] = report_dir
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lap("save")
    return JobResult(output_dir, artifacts, metrics, loop, timings)
