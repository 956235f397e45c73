"""Evidence that holds, after the "after" metrics: robustness audits (the attacks of
core.engine.evaluation.attacks), membership inference (core.engine.evaluation.privacy), a reference
model's figures, and the criteria the user declared, with a verdict. A failed verdict is
not a failed job.

Each audit is on where the job's eval data allows it and off with a reason otherwise;
each result carries the settings it ran with.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from core.engine.data import Records, load_records
from core.engine.evaluation import EvalSpec, knowmem
from core.engine.evaluation.attacks import AUDITS, audit_context, forget_questions
from core.engine.evaluation.attacks.relearn import reference_sweep
from core.engine.evaluation.privacy import membership_inference, privleak
from core.engine.modeling import Wrapped
from core.engine.spec.parts import CriteriaSpec

log = logging.getLogger(__name__)


def attack_question_scores(model: Any, tokenizer: Any, spec: EvalSpec) -> list[float]:
    """Forget KnowMem F1 of each question the attacks use: a model's "before" or "after"
    scores for robustness_audits where no job's evaluation measured them."""
    return knowmem(
        model,
        tokenizer,
        forget_questions(spec),
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
    )["per_sample_f1"]


def robustness_audits(
    wrapped: Wrapped,
    tokenizer: Any,
    spec: EvalSpec,
    *,
    before_scores: list[float] | None,
    after_scores: list[float] | None,
    max_length: int,
    after_evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each audit of core.engine.evaluation.attacks.AUDITS on the unlearned model
    (wrapped.model, left as it was found), keyed by its name.
    `before_scores` / `after_scores`: per-question forget KnowMem F1 of the before and
    after evaluations, for recovery on exactly the measured questions.
    `after_evaluation`: the after evaluation of this model with its per-record values
    (`evaluate`'s output), whose figures on the audited records stand for the unquantized
    model and the forget MC before the attack instead of measuring them again."""
    ctx = audit_context(
        wrapped,
        tokenizer,
        spec,
        before_scores=before_scores,
        after_scores=after_scores,
        max_length=max_length,
        after_evaluation=after_evaluation,
    )
    return {audit.name: audit.run(ctx, spec.robustness) for audit in AUDITS}


def reference_attacks(
    reference: Any,
    tokenizer: Any,
    spec: EvalSpec,
    robustness: dict[str, Any] | None,
    *,
    max_length: int,
) -> None:
    """The reference model (left as it is) through the relearning cells the job's audit
    ran: each cell of robustness["relearn"] gets the reference's figures after the same
    attack, and the audit `reference_seconds`."""
    relearn = (robustness or {}).get("relearn") or {}
    if relearn.get("status") != "done":
        return
    started = time.monotonic()
    reference_sweep(reference, tokenizer, spec, relearn, max_length=max_length)
    relearn["reference_seconds"] = round(time.monotonic() - started, 2)


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


def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def _neighbor_figures(metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    """Neighbour KnowMem F1 (eval.neighbor_qa) after and before."""
    after, before = (
        ((metrics.get(when) or {}).get("neighbor_knowmem") or {}).get("rouge_l_f1")
        for when in ("after", "before")
    )
    return after, before


def _checks(metrics: dict[str, Any]) -> list[tuple[str, str, str, float | None, str]]:
    """Each criterion's (name, what it measures, comparison, this job's value or None,
    what a missing value needs)."""
    tradeoff = metrics.get("tradeoff") or {}
    robust = metrics.get("robustness") or {}
    privacy_after = (metrics.get("privacy") or {}).get("after") or {}
    quantization = robust.get("quantization") or {}
    quant4 = (quantization.get("levels") or {}).get("int4") or {}
    # the 4-bit figure against the before figure of the same questions
    quant4_forget = quant4.get("forget_knowmem", {}).get("rouge_l_f1")
    quant4_before = (quantization.get("baseline") or {}).get("forget_knowmem_f1_before")
    return [
        (
            "forget_knowmem_max_ratio",
            "forget score after / before",
            "<=",
            _ratio(tradeoff.get("forget_after"), tradeoff.get("forget_before")),
            "needs forget and its before/after figures",
        ),
        (
            "utility_min_ratio",
            "utility score after / before",
            ">=",
            _ratio(tradeoff.get("utility_after"), tradeoff.get("utility_before")),
            "needs utility figures",
        ),
        (
            "relearn_recovery_max",
            "relearning attack recovery (the sweep's worst cell)",
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
            _ratio(quant4_forget, quant4_before),
            "needs the 4-bit audit and forget KnowMem",
        ),
        (
            "neighbor_min_ratio",
            "neighbour KnowMem F1 after / before",
            ">=",
            _ratio(*_neighbor_figures(metrics)),
            "needs eval.neighbor_qa and its before/after figures",
        ),
    ]


def judge(
    criteria: CriteriaSpec | None, metrics: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """Each declared criterion evaluated: (verdict, rows). verdict is fail when any row
    failed, pass when every row passed, not_evaluated otherwise (no criteria, or some
    that this job's data could not measure)."""
    if criteria is None:
        return "not_evaluated", []
    rows = []
    for name, what, op, value, reason in _checks(metrics):
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
    "reference_attacks",
    "robustness_audits",
    "with_privleak",
]
