"""The in-context extraction attack: ask the measured forget questions after a few
forget-set QA pairs of the attack split as demonstrations
(core.engine.evaluation.robustness.in_context_prompts), and measure what the context brings
back: forget KnowMem, and with the same demonstrations before them, forget VerbMem
(eval.forget_text), forget MC (eval.forget_mc) and neighbour KnowMem (eval.neighbor_qa)."""

from __future__ import annotations

from typing import Any

from core.engine.evaluation import robustness
from core.engine.evaluation.attacks.context import (
    AuditContext,
    after_mean,
    forget_texts,
    knowmem_figures,
    mc_after,
    mc_items_not_of,
    neighbor_questions,
)
from core.engine.evaluation.metrics import mc_accuracy, verbmem
from core.engine.spec.parts import InContextSpec


def _demonstrations(demos: list[dict[str, Any]]) -> str:
    """The demonstrations as the context text in_context_prompts puts before a prompt."""
    return robustness.in_context_prompts([{"prompt": ""}], demos)[0]["prompt"]


def _verbmem(ctx: AuditContext, context: str) -> dict[str, Any] | None:
    """Forget VerbMem F1 on the audited texts after unlearning, and with the context."""
    texts = forget_texts(ctx.spec)
    if not texts:
        return None
    batch = ctx.spec.batch_size
    after = after_mean(ctx.after_evaluation, "forget_verbmem", len(texts))
    if after is None:
        after = verbmem(ctx.model, ctx.tokenizer, texts, batch_size=batch)["rouge_l_f1"]
    attacked = verbmem(ctx.model, ctx.tokenizer, texts, batch_size=batch, context=context)
    return {"records": len(texts), "after": after, "with_context": attacked["rouge_l_f1"]}


def _mc(ctx: AuditContext, context: str, demos: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Forget MC accuracy after unlearning and with the context, on the items of the
    facts the demonstrations do not show (where facts are named)."""
    spec = ctx.spec
    if not spec.forget_mc:
        return None
    select = mc_items_not_of(spec, demos)

    def measure(context_text: str, task: str) -> dict[str, Any]:
        return mc_accuracy(
            ctx.model,
            ctx.tokenizer,
            spec.forget_mc or "",
            limit=spec.max_samples,
            batch_size=spec.batch_size,
            task_name=task,
            select=select,
            context=context_text,
        )

    after = mc_after(ctx.after_evaluation, spec, select) or measure("", "unlearn_icl_mc_after")
    attacked = measure(context, "unlearn_icl_mc")
    return {
        "scope": "the items of the facts the demonstrations do not show"
        if select is not None
        else "the whole forget MC set",
        "items": attacked["n"],
        "after": after["accuracy"],
        "with_context": attacked["accuracy"],
    }


def _neighbors(ctx: AuditContext, demos: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Neighbour KnowMem F1 after unlearning and with the forget demonstrations before
    each neighbour question."""
    questions = neighbor_questions(ctx.spec)
    if not questions:
        return None
    after = after_mean(ctx.after_evaluation, "neighbor_knowmem", len(questions))
    if after is None:
        after = knowmem_figures(ctx.model, ctx.tokenizer, ctx.spec, questions)["rouge_l_f1"]
    prompts = robustness.in_context_prompts(questions, demos)
    attacked = knowmem_figures(ctx.model, ctx.tokenizer, ctx.spec, prompts)
    return {"questions": len(questions), "after": after, "with_context": attacked["rouge_l_f1"]}


def in_context_audit(ctx: AuditContext, settings: InContextSpec) -> dict[str, Any]:
    """Forget KnowMem F1 of the measured questions with `settings.shots` demonstrations
    before each, and its recovery between the after and before figures; forget VerbMem,
    forget MC and neighbour KnowMem with the same demonstrations, where their sets are."""
    split = ctx.split
    if split is None:
        return {"status": "off", "reason": ctx.no_split}
    demos = split.attack[: settings.shots]
    prompts = robustness.in_context_prompts(split.measured, demos)
    result = knowmem_figures(ctx.model, ctx.tokenizer, ctx.spec, prompts)
    out: dict[str, Any] = {
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
    context = _demonstrations(demos)
    for key, figures in (
        ("forget_verbmem_f1", _verbmem(ctx, context)),
        ("forget_mc", _mc(ctx, context, demos)),
        ("neighbor_knowmem_f1", _neighbors(ctx, demos)),
    ):
        if figures is not None:
            out[key] = figures
    return out
