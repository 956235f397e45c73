"""The relearning attack: fine-tune the unlearned model on some forget questions and
measure how much of the others comes back (core.engine.evaluation.robustness.relearn), on forget
KnowMem and, where there is one, the forget MC set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.engine.data import Records, load_records
from core.engine.evaluation import robustness
from core.engine.evaluation.attacks.context import AuditContext, QuestionSplit, knowmem_figures
from core.engine.evaluation.metrics import mc_accuracy, mc_figures
from core.engine.spec.parts import EvalSpec, RelearnSpec

Select = Callable[[dict[str, Any]], bool]


def _mc_scope(
    spec: EvalSpec, attacked: list[dict[str, Any]]
) -> tuple[Select | None, str, list[dict[str, Any]]]:
    """Which forget MC items the relearning attack is measured on, and in words: those
    of the facts it did not train on, where the forget questions and the MC items name
    their `fact`; else the whole set (the attacked facts' items in it). With the items
    the evaluations ask (the first max_samples)."""
    if not spec.forget_mc:
        return None, "", []
    items = load_records(spec.forget_mc).items[: spec.max_samples]
    facts = {question.get("fact") for question in attacked}
    if None in facts or not all("fact" in item for item in items):
        return (
            None,
            "the whole forget MC set, the attacked facts' items included (the forget "
            "questions and MC items do not all name their `fact`)",
            items,
        )
    return (
        (lambda item: item["fact"] not in facts),
        "the items of the facts the attack did not train on",
        items,
    )


def _mc_after(
    after_evaluation: dict[str, Any] | None,
    items: list[dict[str, Any]],
    select: Select | None,
) -> dict[str, Any] | None:
    """The after evaluation's forget MC accuracy on the selected items, from its answers
    per item; None when it has none for exactly these items."""
    correct = ((after_evaluation or {}).get("forget_mc") or {}).get("per_item_correct")
    if correct is None or len(correct) != len(items):
        return None
    return mc_figures(
        [ok for ok, item in zip(correct, items, strict=True) if select is None or select(item)]
    )


def _forget_mc(
    ctx: AuditContext, forget_mc: str, select: Select | None, task_name: str
) -> dict[str, Any]:
    """The model's forget MC accuracy now (the set at `forget_mc`), on the items
    `select` keeps."""
    return mc_accuracy(
        ctx.model,
        ctx.tokenizer,
        forget_mc,
        limit=ctx.spec.max_samples,
        batch_size=ctx.spec.batch_size,
        task_name=task_name,
        select=select,
    )


def _attack_and_measure(
    ctx: AuditContext, settings: RelearnSpec, split: QuestionSplit, select: Select | None
) -> dict[str, Any]:
    """Fine-tune on the attack questions, then measure forget KnowMem on the measured
    ones (and the forget MC); the caller restores the weights."""
    losses = robustness.relearn(
        ctx.wrapped,
        ctx.tokenizer,
        Records("qa", split.attack),
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        max_length=ctx.max_length,
        seed=ctx.spec.robustness.seed,
    )
    result: dict[str, Any] = {
        "forget_knowmem": knowmem_figures(ctx.model, ctx.tokenizer, ctx.spec, split.measured),
        "losses": [round(x, 4) for x in losses],
    }
    if ctx.spec.forget_mc:
        result["forget_mc"] = _forget_mc(ctx, ctx.spec.forget_mc, select, "unlearn_relearn_mc")
    return result


def relearn_audit(ctx: AuditContext, settings: RelearnSpec) -> dict[str, Any]:
    """Recovery of forget KnowMem on the measured questions after fine-tuning on the
    attack questions, and the forget MC before and after the attack; the model is left
    as it was found."""
    split = ctx.split
    if split is None:
        return {"status": "off", "reason": ctx.no_split}
    select, mc_scope, mc_items = _mc_scope(ctx.spec, split.attack)
    mc_after = (
        (
            _mc_after(ctx.after_evaluation, mc_items, select)
            or _forget_mc(ctx, ctx.spec.forget_mc, select, "unlearn_relearn_mc_after")
        )
        if ctx.spec.forget_mc
        else None
    )
    attacked = robustness.with_weights_restored(
        ctx.wrapped, lambda: _attack_and_measure(ctx, settings, split, select)
    )
    mc_attacked = attacked.pop("forget_mc", None)
    after_attack = attacked["forget_knowmem"]["rouge_l_f1"]
    result: dict[str, Any] = {
        "status": "done",
        "settings": {
            "fraction": settings.fraction,
            "attack_questions": len(split.indices.attack),
            "measured_questions": len(split.indices.measured),
            "steps": settings.steps,
            "learning_rate": settings.learning_rate,
            "batch_size": settings.batch_size,
            "trains": ctx.wrapped.adapter.type,
            "seed": ctx.spec.robustness.seed,
        },
        "forget_knowmem_f1": {
            "before": split.before,
            "after": split.after,
            "after_attack": after_attack,
        },
        "recovery": robustness.recovery(split.before, split.after, after_attack),
        "after_attack": attacked,
    }
    if mc_after is not None and mc_attacked is not None:
        result["forget_mc"] = {
            "scope": mc_scope,
            "items": mc_attacked["n"],
            "after": mc_after["accuracy"],
            "after_attack": mc_attacked["accuracy"],
        }
    return result
