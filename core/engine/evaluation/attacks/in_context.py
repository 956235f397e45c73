"""The in-context extraction attack: ask the measured forget questions after a few
forget-set QA pairs of the attack split as demonstrations
(core.engine.evaluation.robustness.in_context_prompts), and measure what the context brings back."""

from __future__ import annotations

from typing import Any

from core.engine.evaluation import robustness
from core.engine.evaluation.attacks.context import AuditContext, knowmem_figures
from core.engine.spec.parts import InContextSpec


def in_context_audit(ctx: AuditContext, settings: InContextSpec) -> dict[str, Any]:
    """Forget KnowMem F1 of the measured questions with `settings.shots` demonstrations
    before each, and its recovery between the after and before figures."""
    split = ctx.split
    if split is None:
        return {"status": "off", "reason": ctx.no_split}
    demos = split.attack[: settings.shots]
    prompts = robustness.in_context_prompts(split.measured, demos)
    result = knowmem_figures(ctx.model, ctx.tokenizer, ctx.spec, prompts)
    return {
        "status": "done",
        "settings": {
            "shots": len(demos),
            "measured_questions": len(split.indices.measured),
            "demonstrations": "forget-set QA pairs of the attack split",
        },
        "forget_knowmem_f1": {
            "before": split.before,
            "after": split.after,
            "with_context": result["rouge_l_f1"],
        },
        "recovery": robustness.recovery(split.before, split.after, result["rouge_l_f1"]),
    }
