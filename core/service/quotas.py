"""A tenant's limits (the settings' defaults, or the operator's overrides on its row) and
the work a job asks for, estimated before it exists from its spec and its forget file."""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.engine.spec import JobSpec
from core.engine.spec.methods import MAX_STEPS
from core.errors import LimitExceeded, SpecError
from core.service.db import File, Tenant
from core.service.settings import Settings


@dataclass(frozen=True)
class TenantLimits:
    max_active_jobs: int
    max_stored_bytes: int
    max_job_tokens: int
    rate_limit: str


def limits_for(settings: Settings, tenant: Tenant | None) -> TenantLimits:
    def pick(name: str) -> object:
        override = getattr(tenant, name, None) if tenant is not None else None
        return override if override is not None else getattr(settings, name)

    return TenantLimits(
        max_active_jobs=int(pick("max_active_jobs")),  # type: ignore[call-overload]
        max_stored_bytes=int(pick("max_stored_bytes")),  # type: ignore[call-overload]
        max_job_tokens=int(pick("max_job_tokens")),  # type: ignore[call-overload]
        rate_limit=str(pick("rate_limit")),
    )


def estimated_examples(forget: File, max_length: int) -> int:
    """At most how many training sequences the forget file gives: one per QA/chat record;
    for raw text, its windows of max_length tokens, at most one token per byte."""
    records = forget.records or 0
    if forget.kind == "text":
        return records + math.ceil(forget.bytes / max_length)
    return records


def check_work(spec: JobSpec, examples: int, max_job_tokens: int, tenant: str) -> int:
    """The optimizer steps the job would run; SpecError past MAX_STEPS, LimitExceeded when
    steps x batch x accumulation x max_length (the tokens it trains on, at most) is over
    the tenant's max_job_tokens. Both messages say what to change."""
    params = spec.hyperparameters
    if params.max_steps is not None:
        steps = params.max_steps
    else:
        per_epoch = math.ceil(max(examples, 1) / params.batch_size)
        steps = math.ceil(params.epochs * per_epoch / params.gradient_accumulation_steps)
    if steps > MAX_STEPS:
        raise SpecError(
            f"hyperparameters.epochs: {params.epochs} epochs over about {examples} sequences in "
            f"batches of {params.batch_size} make {steps} steps; the limit is {MAX_STEPS}: lower "
            "epochs or set max_steps",
            param="hyperparameters.epochs",
            code="job_too_large",
        )
    tokens = steps * params.batch_size * params.gradient_accumulation_steps * params.max_length
    if tokens > max_job_tokens:
        raise LimitExceeded(
            f"the job would train on up to {tokens:,} tokens ({steps} steps x batch "
            f"{params.batch_size} x accumulation {params.gradient_accumulation_steps} x "
            f"max_length {params.max_length}); tenant {tenant!r} may ask for {max_job_tokens:,} "
            "per job: lower max_steps, epochs, batch_size or max_length, or ask the operator "
            "to raise the limit (MAX_JOB_TOKENS, or `unlearn tenants set`)",
            param="hyperparameters",
            code="job_too_large",
            status=422,
        )
    return steps
