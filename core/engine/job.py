"""A job's context: what validating the spec and loading the model produce, and what
the phases of core.engine.phases read and add to (the metrics being built, the timings,
the figures one phase hands the next).

`open_job` checks everything that can fail cheaply (files, kinds, devices, the job's
size, a checkpoint of another run) before the evaluation spends any time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.engine import losses
from core.engine.checkpoint import ensure_resumable, run_fingerprint
from core.engine.contrast import ContrastSet, build_contrast
from core.engine.contrast import contrast_records as contrast_set_records
from core.engine.data import Encoded, Example, Records, encode_records, load_records
from core.engine.evaluation import EvalSpec
from core.engine.events import Events, Phase
from core.engine.formats import check_file
from core.engine.model_cache import ModelCache
from core.engine.modeling import (
    Wrapped,
    check_quantization,
    fit_max_length,
    load_base,
    pick_device,
    reset_peak_memory,
    wrap,
)
from core.engine.robust.stage import check_distill_file
from core.engine.sequential import (
    StartPoint,
    check_same_architecture,
    merge_start,
    start_digest,
    start_point,
)
from core.engine.sharded import check_devices
from core.engine.spec import JobSpec
from core.engine.spec.methods import MAX_STEPS, Method, TrainingParams, get_method, prepare
from core.engine.spec.parts import EVAL_FILE_KINDS, TRAIN_FILE_KINDS
from core.engine.train import LoopResult, total_steps
from core.errors import DataError, DeviceError, SpecError


@dataclass
class Stopwatch:
    """Seconds per stage: `lap(name)` records the time since the previous lap."""

    laps: dict[str, float] = field(default_factory=dict)
    mark: float = field(default_factory=time.monotonic)

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self.mark, 3)
        self.mark = now


@dataclass
class JobOptions:
    """How the caller runs the job (run_job's keyword arguments)."""

    events: Events
    device: str | None = None
    checkpoint_dir: Path | None = None
    shown: dict[str, str] = field(default_factory=dict)
    max_tokens: int | None = None
    chain: list[dict[str, Any]] | None = None
    models: ModelCache | None = None


@dataclass
class JobInputs:
    """The spec's method and records, read and checked, and where a sequential job
    starts."""

    method: Method[Any]
    forget: Records
    retain: Records | None
    contrast: Records | None
    start: StartPoint | None


@dataclass
class JobContext:
    """One job between its phases: the spec, the loaded model, the metrics being built
    and what a phase hands a later one."""

    spec: JobSpec
    output_dir: Path
    options: JobOptions
    clock: Stopwatch
    method: Method[Any]
    forget_records: Records
    start: StartPoint | None
    device: torch.device
    sharded: int | None  # ranks of a sharded job; None on one device
    wrapped: Wrapped
    tokenizer: Any
    max_length: int
    encoded: dict[str, Encoded]  # "forget", and "retain" where there is a retain file
    contrast: ContrastSet | None
    steps: int
    base_load: dict[str, Any] | None  # what the model cache did, where there is one
    fingerprint: str | None = None  # what a checkpoint must match (with a checkpoint_dir)
    metrics: dict[str, Any] = field(default_factory=dict)
    probe_every: int | None = None  # the stop rule's steps between probes; None: off
    unwatched_from: int | None = None
    token_view: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    before_scores: list[float] | None = None
    after_scores: list[float] | None = None
    after_evaluation: dict[str, Any] | None = None  # with its per-record values
    privacy: dict[str, Any] = field(default_factory=dict)
    loop: LoopResult | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)

    @property
    def events(self) -> Events:
        return self.options.events

    @property
    def params(self) -> TrainingParams:
        return self.spec.hyperparameters

    @property
    def forget(self) -> list[Example]:
        return self.encoded["forget"].examples

    @property
    def retain(self) -> list[Example] | None:
        return self.encoded["retain"].examples if "retain" in self.encoded else None

    @property
    def contrast_examples(self) -> list[Example] | None:
        return self.contrast.examples if self.contrast is not None else None

    def trained(self) -> LoopResult:
        """The unlearning loop's result; RuntimeError before the unlearn phase ran."""
        if self.loop is None:
            raise RuntimeError("the unlearn phase has not run")
        return self.loop


def _check_eval_files(ev: EvalSpec, forget_kind: str) -> None:
    """Every eval file exists, is valid and holds its slot's kind, before any model is
    loaded (a QA file given as forget_mc would fail inside lm-eval, after the load); the
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


def validate(spec: JobSpec) -> JobInputs:
    """The method, the records of every file and the start point, checked before any
    model is loaded."""
    method = get_method(spec.method)
    forget = load_records(spec.forget_file, allowed_kinds=TRAIN_FILE_KINDS)
    retain = (
        load_records(spec.retain_file, allowed_kinds=TRAIN_FILE_KINDS) if spec.retain_file else None
    )
    contrast = None
    if spec.contrast_file:
        try:
            contrast = load_records(spec.contrast_file, allowed_kinds=TRAIN_FILE_KINDS)
        except DataError as exc:
            raise DataError(f"contrast_file: {exc.message}", param="contrast_file") from None
    if method.uses_contrast:  # its pairing with the forget set, checked before any load
        contrast_set_records(forget, contrast, spec.hyperparameters.seed)
    if spec.eval is not None:
        _check_eval_files(spec.eval, forget.kind)
    check_distill_file(spec)  # the distillation set repeats no forget data
    start = start_point(spec.init_from_job) if spec.init_from_job else None
    if start is not None and start.kind == "model":
        check_same_architecture(spec.base_model, start)
    return JobInputs(method, forget, retain, contrast, start)


def _check_device(spec: JobSpec, start: StartPoint | None, device: str | None) -> torch.device:
    """The device the job runs on, refused before loading where the loss backend, the
    quantization or the sharding cannot run there."""
    torch_device = pick_device(device)
    reset_peak_memory(torch_device)
    try:
        losses.check_device(torch_device)
    except ValueError as exc:  # LOSS_BACKEND=triton on a CPU worker: refused before loading
        raise DeviceError(f"{exc}; use the auto loss backend", param="loss_backend") from None
    check_quantization(spec.adapter.quantize, torch_device)
    if spec.resources.gpus > 1:
        check_devices(spec.resources.gpus, torch_device)
    if spec.adapter.quantize is not None and start is not None:
        raise SpecError(
            "init_from_job with adapter.quantize: the previous job's output is merged into "
            "the base model first, which a 4-bit base cannot take; drop adapter.quantize",
            param="adapter.quantize",
        )
    return torch_device


def _load_start(
    spec: JobSpec, start: StartPoint | None, device: torch.device, models: ModelCache | None
) -> tuple[Any, Any]:
    """(model, tokenizer) a job starts from: a QLoRA job's own 4-bit load (never the
    cache); the base model (from the worker's warm cache where it has one); after a
    previous LoRA job, with that job's adapter merged in; after a full-weight job, that
    job's weights."""
    if spec.adapter.quantize is not None:
        return load_base(spec.base_model, device, quantize=spec.adapter.quantize)
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


def _encode(
    spec: JobSpec, inputs: JobInputs, tokenizer: Any, max_length: int
) -> tuple[dict[str, Encoded], ContrastSet | None]:
    """The forget (and retain) sets tokenized, and the contrast set of a method that
    uses one."""
    params = spec.hyperparameters
    encoded = {
        "forget": encode_records(inputs.forget, tokenizer, max_length, eos_target=params.forget_eos)
    }
    if inputs.retain:
        encoded["retain"] = encode_records(inputs.retain, tokenizer, max_length)
    contrast = None
    if inputs.method.uses_contrast:
        contrast = build_contrast(
            inputs.forget, encoded["forget"], inputs.contrast, tokenizer, max_length, params.seed
        )
    return encoded, contrast


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


def _start_identity(start: StartPoint | None, chain: list[dict[str, Any]] | None) -> str | None:
    """What names the weights a sequential job starts from, for its checkpoint fingerprint:
    the sha256 the service checked its download against (the chain's last link), else a
    digest of the local files (`unlearn run`)."""
    if start is None:
        return None
    known = chain[-1].get("sha256") if chain else None
    return str(known) if known else start_digest(start)


def open_job(spec: JobSpec, output_dir: Path, options: JobOptions, clock: Stopwatch) -> JobContext:
    """Validate the spec, load and wrap the model, tokenize the data, and check the
    job's size and any checkpoint it would resume from: the context the phases share."""
    events, params = options.events, spec.hyperparameters
    events.phase(Phase.VALIDATING)
    inputs = validate(spec)
    clock.lap("validate")
    events.phase(Phase.LOADING)
    device = _check_device(spec, inputs.start, options.device)
    model, tokenizer = _load_start(spec, inputs.start, device, options.models)
    base_load = dict(options.models.last) if options.models is not None else None
    max_length, length_warning = fit_max_length(model, params.max_length)
    encoded, contrast = _encode(spec, inputs, tokenizer, max_length)
    warnings = [length_warning] + [its.warning(role) for role, its in encoded.items()]
    warnings.append(contrast.warning() if contrast is not None else None)
    for warning in filter(None, warnings):
        events.warning(warning)
    steps = _check_length(params, len(encoded["forget"].examples), max_length, options.max_tokens)
    method = inputs.method
    wrapped = wrap(
        model, spec.adapter, need_reference=method.needs_reference(params), seed=params.seed
    )
    prepare(wrapped, method, params)  # what trains, before the fingerprint names it
    sharded = spec.resources.gpus if spec.resources.gpus > 1 else None
    ctx = JobContext(
        spec=spec,
        output_dir=output_dir,
        options=options,
        clock=clock,
        method=method,
        forget_records=inputs.forget,
        start=inputs.start,
        device=device,
        sharded=sharded,
        wrapped=wrapped,
        tokenizer=tokenizer,
        max_length=max_length,
        encoded=encoded,
        contrast=contrast,
        steps=steps,
        base_load=base_load,
    )
    if options.checkpoint_dir:  # another run's checkpoint: refused before the evaluation
        ctx.fingerprint = run_fingerprint(
            method,
            params,
            wrapped,
            ctx.forget,
            ctx.retain,
            ctx.contrast_examples,
            start=_start_identity(inputs.start, options.chain),
        )
        ensure_resumable(options.checkpoint_dir, ctx.fingerprint, sharded=sharded is not None)
    clock.lap("load")
    return ctx
