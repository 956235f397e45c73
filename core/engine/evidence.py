"""Evidence that holds, after the "after" metrics: robustness audits (core.engine.
robustness), membership inference (core.engine.privacy), a reference model's figures,
and the criteria the user declared, with a verdict. A failed verdict is not a failed job.

Each audit is on where the job's eval data allows it and off with a reason otherwise;
each result carries the settings it ran with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from core.engine import robustness
from core.engine.data import Records, load_records
from core.engine.evaluation import (
    EvalSpec,
    evaluate,
    knowmem,
    mc_accuracy,
    mc_figures,
    on_first,
    strip_per_record,
)
from core.engine.privacy import membership_inference, privleak
from core.engine.spec_parts import CriteriaSpec

log = logging.getLogger(__name__)

MIN_ATTACK_QUESTIONS = 5  # below this the split leaves too little to attack or to measure


def _attack_size(spec: EvalSpec) -> int:
    """How many questions of each QA set the attacks use: the first ones the before and
    after evaluations measured, at most eval.robustness.max_samples."""
    return min(spec.max_samples, spec.robustness.max_samples)


def _forget_questions(spec: EvalSpec) -> list[dict[str, Any]]:
    return load_records(spec.forget_qa).items[: _attack_size(spec)] if spec.forget_qa else []


def attack_question_scores(model: Any, tokenizer: Any, spec: EvalSpec) -> list[float]:
    """Forget KnowMem F1 of each question the attacks use: a model's "before" or "after"
    scores for robustness_audits where no job's evaluation measured them."""
    return knowmem(
        model,
        tokenizer,
        _forget_questions(spec),
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
    )["per_sample_f1"]


def _knowmem(
    model: Any, tokenizer: Any, spec: EvalSpec, records: list[dict[str, Any]]
) -> dict[str, float]:
    result = knowmem(
        model, tokenizer, records, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size
    )
    return {
        "rouge_l_f1": result["rouge_l_f1"],
        "rouge_l_recall": result["rouge_l_recall"],
        "n": result["n"],
    }


def _mc_scope(
    spec: EvalSpec, attacked: list[dict[str, Any]]
) -> tuple[Callable[[dict[str, Any]], bool] | None, str, list[dict[str, Any]]]:
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
    select: Callable[[dict[str, Any]], bool] | None,
) -> dict[str, Any] | None:
    """The after evaluation's forget MC accuracy on the selected items, from its answers
    per item; None when it has none for exactly these items."""
    correct = ((after_evaluation or {}).get("forget_mc") or {}).get("per_item_correct")
    if correct is None or len(correct) != len(items):
        return None
    return mc_figures(
        [ok for ok, item in zip(correct, items, strict=True) if select is None or select(item)]
    )


def _mean(values: list[float], indices: list[int]) -> float:
    return sum(values[i] for i in indices) / len(indices)


def robustness_audits(
    wrapped: Any,
    tokenizer: Any,
    spec: EvalSpec,
    *,
    before_scores: list[float] | None,
    after_scores: list[float] | None,
    max_length: int,
    after_evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The three attacks on the unlearned model (wrapped.model, left as it was found).
    `before_scores` / `after_scores`: per-question forget KnowMem F1 of the before and
    after evaluations, for recovery on exactly the measured questions.
    `after_evaluation`: the after evaluation of this model with its per-record values
    (`evaluate`'s output), whose figures on the audited records stand for the unquantized
    model and the forget MC before the attack instead of measuring them again."""
    settings = spec.robustness
    model = wrapped.model
    questions = _forget_questions(spec)
    before_scores = before_scores[: len(questions)] if before_scores else before_scores
    after_scores = after_scores[: len(questions)] if after_scores else after_scores
    out: dict[str, Any] = {}
    split = None
    if len(questions) >= MIN_ATTACK_QUESTIONS and before_scores and after_scores:
        split = robustness.split_for_attack(
            len(questions), settings.relearn.fraction, settings.seed
        )
    no_split = (
        f"needs eval.forget_qa with at least {MIN_ATTACK_QUESTIONS} questions"
        if len(questions) < MIN_ATTACK_QUESTIONS
        else "needs the before and after forget KnowMem"
    )

    # --- relearning
    relearn = settings.relearn
    if relearn.enabled is False:
        out["relearn"] = {"status": "off", "reason": "eval.robustness.relearn.enabled is false"}
    elif split is None:
        out["relearn"] = {"status": "off", "reason": no_split}
    else:
        assert before_scores is not None and after_scores is not None
        attack = Records("qa", [questions[i] for i in split.attack])
        measured = [questions[i] for i in split.measured]
        started = time.monotonic()
        select, mc_scope, mc_items = _mc_scope(spec, attack.items)

        def forget_mc(name: str) -> dict[str, Any]:
            assert spec.forget_mc is not None
            return mc_accuracy(
                model,
                tokenizer,
                spec.forget_mc,
                limit=spec.max_samples,
                batch_size=spec.batch_size,
                task_name=name,
                select=select,
            )

        mc_after = (
            (_mc_after(after_evaluation, mc_items, select) or forget_mc("unlearn_relearn_mc_after"))
            if spec.forget_mc
            else None
        )

        def attack_and_measure() -> dict[str, Any]:
            losses = robustness.relearn(
                wrapped,
                tokenizer,
                attack,
                steps=relearn.steps,
                learning_rate=relearn.learning_rate,
                batch_size=relearn.batch_size,
                max_length=max_length,
                seed=settings.seed,
            )
            result: dict[str, Any] = {
                "forget_knowmem": _knowmem(model, tokenizer, spec, measured),
                "losses": [round(x, 4) for x in losses],
            }
            if spec.forget_mc:
                result["forget_mc"] = forget_mc("unlearn_relearn_mc")
            return result

        attacked = robustness.with_weights_restored(wrapped, attack_and_measure)
        mc_attacked = attacked.pop("forget_mc", None)
        before = _mean(before_scores, split.measured)
        after = _mean(after_scores, split.measured)
        after_attack = attacked["forget_knowmem"]["rouge_l_f1"]
        out["relearn"] = {
            "status": "done",
            "settings": {
                "fraction": relearn.fraction,
                "attack_questions": len(split.attack),
                "measured_questions": len(split.measured),
                "steps": relearn.steps,
                "learning_rate": relearn.learning_rate,
                "batch_size": relearn.batch_size,
                "trains": wrapped.adapter.type,
                "seed": settings.seed,
            },
            "forget_knowmem_f1": {"before": before, "after": after, "after_attack": after_attack},
            "recovery": robustness.recovery(before, after, after_attack),
            "after_attack": attacked,
            **(
                {
                    "forget_mc": {
                        "scope": mc_scope,
                        "items": mc_attacked["n"],
                        "after": mc_after["accuracy"],
                        "after_attack": mc_attacked["accuracy"],
                    }
                }
                if mc_after is not None and mc_attacked is not None
                else {}
            ),
            "seconds": round(time.monotonic() - started, 2),
        }

    # --- quantization
    quant = settings.quantization
    if quant.enabled is False:
        out["quantization"] = {
            "status": "off",
            "reason": "eval.robustness.quantization.enabled is false",
        }
    elif not (spec.forget_qa or spec.forget_text or spec.forget_mc):
        out["quantization"] = {
            "status": "off",
            "reason": "needs a forget eval set (eval.forget_qa, forget_text or forget_mc)",
        }
    else:
        started = time.monotonic()
        schemes = [f"int{bits}" for bits in quant.bits]
        nf4_reason = robustness.nf4_available(model)
        if quant.nf4 is not False and nf4_reason is None:
            schemes.append("nf4")
        levels: dict[str, Any] = {}
        for scheme in schemes:
            level_started = time.monotonic()
            copy = robustness.quantized_copy(model, scheme, quant.group_size)
            levels[scheme] = {
                **_figures(copy, tokenizer, spec),
                "seconds": round(time.monotonic() - level_started, 2),
            }
            del copy
        from_after = on_first(after_evaluation, _attack_size(spec)) if after_evaluation else None
        baseline: dict[str, Any] = {
            "unquantized": from_after or _figures(model, tokenizer, spec),
            "unquantized_from": "the after evaluation, its figures on these records"
            if from_after
            else "measured here",
        }
        if before_scores:
            baseline["forget_knowmem_f1_before"] = sum(before_scores) / len(before_scores)
        out["quantization"] = {
            "status": "done",
            "baseline": baseline,
            "settings": {
                "group_size": quant.group_size,
                "weights": "every linear layer but the output head",
                "lora": "merged into the base first",
                "measured": f"every eval metric on the first {_attack_size(spec)} records "
                "of each eval set",
                "nf4": "run"
                if "nf4" in schemes
                else f"off: {nf4_reason or 'eval.robustness.quantization.nf4 is false'}",
            },
            "levels": levels,
            "seconds": round(time.monotonic() - started, 2),
        }

    # --- in-context extraction
    icl = settings.in_context
    if icl.enabled is False:
        out["in_context"] = {
            "status": "off",
            "reason": "eval.robustness.in_context.enabled is false",
        }
    elif split is None:
        out["in_context"] = {"status": "off", "reason": no_split}
    else:
        assert before_scores is not None and after_scores is not None
        started = time.monotonic()
        demos = [questions[i] for i in split.attack[: icl.shots]]
        prompts = robustness.in_context_prompts([questions[i] for i in split.measured], demos)
        result = _knowmem(model, tokenizer, spec, prompts)
        before = _mean(before_scores, split.measured)
        after = _mean(after_scores, split.measured)
        out["in_context"] = {
            "status": "done",
            "settings": {
                "shots": len(demos),
                "measured_questions": len(split.measured),
                "demonstrations": "forget-set QA pairs of the attack split",
            },
            "forget_knowmem_f1": {
                "before": before,
                "after": after,
                "with_context": result["rouge_l_f1"],
            },
            "recovery": robustness.recovery(before, after, result["rouge_l_f1"]),
            "seconds": round(time.monotonic() - started, 2),
        }
    return out


def _figures(model: Any, tokenizer: Any, spec: EvalSpec) -> dict[str, Any]:
    """Every forget and utility metric the eval sets allow (KnowMem, VerbMem, perplexity,
    MC), as the before and after evaluations measure them, on the first records of each
    set (at most eval.robustness.max_samples)."""
    figures = strip_per_record(evaluate(model, tokenizer, spec, max_samples=_attack_size(spec)))
    figures.pop("settings")
    for value in figures.values():
        value.pop("samples", None)
    return figures


def privacy_audit(
    model: Any, tokenizer: Any, spec: EvalSpec, forget: Records, *, max_length: int
) -> dict[str, Any]:
    """Min-K% and Min-K%++ AUC of the forget set against eval.holdout, or why not."""
    if spec.privacy.enabled is False:
        return {"status": "off", "reason": "eval.privacy.enabled is false"}
    if not spec.holdout:
        return {
            "status": "off",
            "reason": "needs eval.holdout: records of the forget set's kind the "
            "model never saw (non-members)",
        }
    holdout = load_records(spec.holdout)
    result = membership_inference(
        model,
        tokenizer,
        forget,
        holdout,
        max_length=max_length,
        k=spec.privacy.k,
        max_samples=spec.privacy.max_samples,
        batch_size=min(spec.batch_size, 32),
    )
    return {"status": "done", **result}


def with_privleak(privacy: dict[str, Any]) -> dict[str, Any]:
    """PrivLeak of the after and before AUCs against the reference's, where measured."""
    reference = privacy.get("reference") or {}
    for when in ("before", "after"):
        measured = privacy.get(when) or {}
        if measured.get("status") == "done" and reference.get("status") == "done":
            privacy.setdefault("privleak", {})[when] = {
                score: privleak(measured[f"{score}_auc"], reference[f"{score}_auc"])
                for score in ("min_k", "min_k_plus_plus")
            }
    return privacy


def judge(
    criteria: CriteriaSpec | None, metrics: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """Each declared criterion evaluated: (verdict, rows). verdict is fail when any row
    failed, pass when every row passed, not_evaluated otherwise (no criteria, or some
    that this job's data could not measure)."""
    if criteria is None:
        return "not_evaluated", []
    rows = []
    tradeoff = metrics.get("tradeoff") or {}
    robust = metrics.get("robustness") or {}
    privacy_after = (metrics.get("privacy") or {}).get("after") or {}

    def ratio(after: float | None, before: float | None) -> float | None:
        return None if after is None or not before else after / before

    quantization = robust.get("quantization") or {}
    quant4 = (quantization.get("levels") or {}).get("int4") or {}
    before_forget = tradeoff.get("forget_before")
    # the 4-bit figure against the before figure of the same questions
    quant4_forget = quant4.get("forget_knowmem", {}).get("rouge_l_f1")
    quant4_before = (quantization.get("baseline") or {}).get("forget_knowmem_f1_before")
    checks = [
        (
            "forget_knowmem_max_ratio",
            "forget score after / before",
            "<=",
            ratio(tradeoff.get("forget_after"), before_forget),
            "needs forget and its before/after figures",
        ),
        (
            "utility_min_ratio",
            "utility score after / before",
            ">=",
            ratio(tradeoff.get("utility_after"), tradeoff.get("utility_before")),
            "needs utility figures",
        ),
        (
            "relearn_recovery_max",
            "relearning attack recovery",
            "<=",
            (robust.get("relearn") or {}).get("recovery"),
            "needs the relearning attack, with something to recover",
        ),
        (
            "mia_auc_max_distance",
            "|Min-K%++ AUC after - 0.5|",
            "<=",
            None
            if privacy_after.get("status") != "done"
            else abs(privacy_after["min_k_plus_plus_auc"] - 0.5),
            "needs the membership inference audit (eval.holdout)",
        ),
        (
            "quantized_forget_max_ratio",
            "forget KnowMem at 4 bits / before",
            "<=",
            ratio(quant4_forget, quant4_before),
            "needs the 4-bit audit and forget KnowMem",
        ),
    ]
    for name, what, op, value, reason in checks:
        threshold = getattr(criteria, name)
        if threshold is None:
            continue
        row: dict[str, Any] = {
            "criterion": name,
            "measures": what,
            "threshold": f"{op} {threshold}",
            "value": value,
        }
        if value is None:
            row |= {"passed": None, "reason": reason}
        else:
            row["passed"] = value <= threshold if op == "<=" else value >= threshold
        rows.append(row)
    if any(row["passed"] is False for row in rows):
        return "fail", rows
    if rows and all(row["passed"] is True for row in rows):
        return "pass", rows
    return "not_evaluated", rows


__all__ = [
    "attack_question_scores",
    "judge",
    "privacy_audit",
    "robustness_audits",
    "with_privleak",
]
