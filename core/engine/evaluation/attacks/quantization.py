"""The quantization audit: every forget and utility metric re-measured on copies of the
unlearned model rounded to fewer bits (core.engine.evaluation.robustness.quantized_copy), where a
change too small for the grid disappears and what looked forgotten can come back."""

from __future__ import annotations

import time
from typing import Any

from core.engine.evaluation import robustness
from core.engine.evaluation.attacks.context import AuditContext, attack_size
from core.engine.evaluation.metrics import evaluate, on_first, strip_per_record
from core.engine.spec.parts import EvalSpec, QuantizationSpec


def _figures(model: Any, tokenizer: Any, spec: EvalSpec) -> dict[str, Any]:
    """Every forget and utility metric the eval sets allow (KnowMem, VerbMem, perplexity,
    MC), as the before and after evaluations measure them, on the first records of each
    set (at most eval.robustness.max_samples)."""
    figures = strip_per_record(evaluate(model, tokenizer, spec, max_samples=attack_size(spec)))
    figures.pop("settings")
    for value in figures.values():
        value.pop("samples", None)
    return figures


def _baseline(ctx: AuditContext) -> dict[str, Any]:
    """The unquantized model's figures on the audited records (the after evaluation's
    where it has them, else measured), and the forget KnowMem F1 before unlearning."""
    spec = ctx.spec
    from_after = on_first(ctx.after_evaluation, attack_size(spec)) if ctx.after_evaluation else None
    baseline: dict[str, Any] = {
        "unquantized": from_after or _figures(ctx.model, ctx.tokenizer, spec),
        "unquantized_from": "the after evaluation, its figures on these records"
        if from_after
        else "measured here",
    }
    if ctx.before_scores:
        baseline["forget_knowmem_f1_before"] = sum(ctx.before_scores) / len(ctx.before_scores)
    return baseline


def quantization_audit(ctx: AuditContext, settings: QuantizationSpec) -> dict[str, Any]:
    """Each scheme's figures (int8 and int4 by default, nf4 where bitsandbytes runs it)
    against the unquantized model's; the model itself is left as it was found."""
    spec = ctx.spec
    if not (spec.forget_qa or spec.forget_text or spec.forget_mc):
        return {
            "status": "off",
            "reason": "needs a forget eval set (eval.forget_qa, forget_text or forget_mc)",
        }
    schemes = [f"int{bits}" for bits in settings.bits]
    nf4_reason = robustness.nf4_available(ctx.model)
    if settings.nf4 is not False and nf4_reason is None:
        schemes.append("nf4")
    levels: dict[str, Any] = {}
    for scheme in schemes:
        level_started = time.monotonic()
        copy = robustness.quantized_copy(ctx.model, scheme, settings.group_size)
        levels[scheme] = {
            **_figures(copy, ctx.tokenizer, spec),
            "seconds": round(time.monotonic() - level_started, 2),
        }
        del copy
    return {
        "status": "done",
        "baseline": _baseline(ctx),
        "settings": {
            "group_size": settings.group_size,
            "weights": "every linear layer but the output head",
            "lora": "merged into the base first",
            "measured": f"every eval metric on the first {attack_size(spec)} records "
            "of each eval set",
            "nf4": "run"
            if "nf4" in schemes
            else f"off: {nf4_reason or 'eval.robustness.quantization.nf4 is false'}",
        },
        "levels": levels,
    }
