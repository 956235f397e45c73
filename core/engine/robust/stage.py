"""The distillation stage of a job (spec.robustify), between the unlearning loop and the
after evaluation: the unlearned model is the teacher, a shrunk-and-perturbed copy of it
the student, distilled on the job's distill_file; the student is what the job evaluates,
audits and saves (full weights: a LoRA job's adapter is merged into its base first, in a
copy, so a cached base model stays as it was)."""

from __future__ import annotations

import copy
import time
from typing import Any

from core.engine.data import encode_records, load_records
from core.engine.events import Events, Phase
from core.engine.modeling import AdapterSpec, Wrapped
from core.engine.robust.distill import Watch, distill, shrink_and_perturb
from core.engine.robust.overlap import check_distill_set
from core.engine.spec import JobSpec
from core.engine.spec.parts import TRAIN_FILE_KINDS
from core.errors import DataError


def check_distill_file(spec: JobSpec) -> None:
    """Before any model loads: the distill_file is valid and repeats no forget data."""
    if spec.distill_file is None:
        return
    try:
        distill_records = load_records(spec.distill_file, allowed_kinds=TRAIN_FILE_KINDS)
    except DataError as exc:
        raise DataError(f"distill_file: {exc.message}", param="distill_file") from None
    forget = load_records(spec.forget_file, allowed_kinds=TRAIN_FILE_KINDS)
    check_distill_set(forget, distill_records)


def _full_weights(wrapped: Wrapped) -> Any:
    """The unlearned model as one set of full weights: a LoRA adapter merged into a copy
    of its base; full weights as they are."""
    if wrapped.adapter.type == "lora":
        return copy.deepcopy(wrapped.model).merge_and_unload()
    return wrapped.model


def run_distillation(
    wrapped: Wrapped, tokenizer: Any, spec: JobSpec, max_length: int, events: Events
) -> tuple[Wrapped, dict[str, Any]]:
    """Shrink-and-perturb, then distil the unlearned teacher (`wrapped`) into the student
    on spec.distill_file, watched by the utility stop rule where eval has forget and
    retain questions. Returns the student, as full weights, and what the metrics say."""
    options, distill_file = spec.robustify, spec.distill_file
    if options is None or distill_file is None:
        raise ValueError("the distillation stage needs spec.robustify and spec.distill_file")
    started = time.monotonic()
    events.phase(Phase.DISTILLING, f"{options.steps} steps")
    records = load_records(distill_file, allowed_kinds=TRAIN_FILE_KINDS)
    encoded = encode_records(records, tokenizer, max_length)
    if not encoded.examples:
        raise DataError(
            f"distill_file: no record keeps a token within max_length {max_length}",
            param="distill_file",
        )
    student = _full_weights(wrapped)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    shrink_and_perturb(student, options.alpha, options.seed)
    watch = None
    ev = spec.eval
    if ev is not None and ev.forget_qa and ev.retain_qa:
        every = options.probe_every or max(1, options.steps // 20)
        watch = Watch(tokenizer, ev, every, events)
    result = distill(
        student,
        teacher,
        encoded.examples,
        options,
        pad_id=tokenizer.pad_token_id,
        events=events,
        watch=watch,
    )
    del teacher
    metrics = {
        "options": options.model_dump(),
        "data": encoded.summary(),
        "steps": {"done": result.steps_done, "planned": result.total_steps},
        "stop_reason": result.stop_reason,
        "teacher_probe": result.teacher,
        "probes": result.probes,
        "final_loss": result.history[-1].loss if result.history else None,
        "output": "full weights",
        "seconds": round(time.monotonic() - started, 3),
    }
    return Wrapped(student, AdapterSpec(type="full")), metrics
