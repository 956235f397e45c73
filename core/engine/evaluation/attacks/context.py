"""What every robustness audit is given (`AuditContext`) and the shape each one has
(`Audit`): its settings in, its figures and the settings it used out.

An audit is on where the job's eval data allows it and off with a reason otherwise;
`Audit.run` turns it off where its settings say `enabled: false` and times it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from core.engine.data import load_records
from core.engine.evaluation import robustness
from core.engine.evaluation.metrics import knowmem, mc_figures
from core.engine.modeling import Wrapped
from core.engine.spec.parts import EvalSpec, RobustnessSpec

Select = Callable[[dict[str, Any]], bool]
MIN_ATTACK_QUESTIONS = 5  # below this the split leaves too little to attack or to measure


def attack_size(spec: EvalSpec) -> int:
    """How many questions of each QA set the attacks use: the first ones the before and
    after evaluations measured, at most eval.robustness.max_samples."""
    return min(spec.max_samples, spec.robustness.max_samples)


def forget_questions(spec: EvalSpec) -> list[dict[str, Any]]:
    """The forget QA records the attacks use (the first attack_size of eval.forget_qa)."""
    return load_records(spec.forget_qa).items[: attack_size(spec)] if spec.forget_qa else []


def neighbor_questions(spec: EvalSpec) -> list[dict[str, Any]]:
    """The neighbour QA records the attacks measure (the first attack_size of
    eval.neighbor_qa): what must survive, re-measured under each attack."""
    return load_records(spec.neighbor_qa).items[: attack_size(spec)] if spec.neighbor_qa else []


def forget_texts(spec: EvalSpec) -> list[dict[str, Any]]:
    """The forget text records the attacks measure VerbMem on (the first attack_size of
    eval.forget_text)."""
    return load_records(spec.forget_text).items[: attack_size(spec)] if spec.forget_text else []


def mc_items_not_of(spec: EvalSpec, used: list[dict[str, Any]]) -> Select | None:
    """Which forget MC items to measure after an attack used the QA records `used`: those
    of the other facts where every used record and every MC item names its `fact`, else
    all (None)."""
    if not spec.forget_mc:
        return None
    items = load_records(spec.forget_mc).items[: spec.max_samples]
    facts = {record.get("fact") for record in used}
    if None in facts or not all("fact" in item for item in items):
        return None
    return lambda item: item["fact"] not in facts


def after_mean(
    after_evaluation: dict[str, Any] | None, key: str, n: int, field: str = "per_sample_f1"
) -> float | None:
    """The after evaluation's mean of `field` over the first n records of metric `key`
    (what a measurement of the same model on those records gives); None without them."""
    values = ((after_evaluation or {}).get(key) or {}).get(field)
    if not values or len(values) < n or n <= 0:
        return None
    return sum(float(v) for v in values[:n]) / n


def mc_after(
    after_evaluation: dict[str, Any] | None, spec: EvalSpec, select: Select | None
) -> dict[str, Any] | None:
    """The after evaluation's forget MC accuracy on the items `select` keeps (of the
    first max_samples), from its answers per item; None without them."""
    correct = ((after_evaluation or {}).get("forget_mc") or {}).get("per_item_correct")
    if correct is None or not spec.forget_mc:
        return None
    items = load_records(spec.forget_mc).items[: spec.max_samples]
    if len(correct) != len(items):
        return None
    return mc_figures(
        [ok for ok, item in zip(correct, items, strict=True) if select is None or select(item)]
    )


def knowmem_figures(
    model: Any, tokenizer: Any, spec: EvalSpec, records: list[dict[str, Any]]
) -> dict[str, float]:
    """KnowMem's ROUGE-L F1, recall and count on `records`, without per-record values."""
    result = knowmem(
        model, tokenizer, records, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size
    )
    return {
        "rouge_l_f1": result["rouge_l_f1"],
        "rouge_l_recall": result["rouge_l_recall"],
        "n": result["n"],
    }


def _mean(values: list[float], indices: list[int]) -> float:
    return sum(values[i] for i in indices) / len(indices)


@dataclass(frozen=True)
class QuestionSplit:
    """The forget questions split for the attacks (robustness.split_for_attack), with
    each question's forget KnowMem F1 before and after unlearning."""

    questions: list[dict[str, Any]]
    indices: robustness.AttackSplit
    before_scores: list[float]
    after_scores: list[float]

    @property
    def attack(self) -> list[dict[str, Any]]:
        """The questions an attack may use (train on, or show as demonstrations)."""
        return [self.questions[i] for i in self.indices.attack]

    @property
    def measured(self) -> list[dict[str, Any]]:
        """The questions every measurement scores, none of which an attack uses."""
        return [self.questions[i] for i in self.indices.measured]

    @property
    def before(self) -> float:
        """Mean forget KnowMem F1 of the measured questions before unlearning."""
        return _mean(self.before_scores, self.indices.measured)

    @property
    def after(self) -> float:
        """Mean forget KnowMem F1 of the measured questions after unlearning."""
        return _mean(self.after_scores, self.indices.measured)


@dataclass(frozen=True)
class AuditContext:
    """The unlearned model and what the audits read: the eval spec, the forget questions'
    split (None where there is too little to split, `no_split` says why), the before
    scores of those questions and the after evaluation with its per-record values."""

    wrapped: Wrapped
    tokenizer: Any
    spec: EvalSpec
    max_length: int
    before_scores: list[float] | None
    after_evaluation: dict[str, Any] | None
    split: QuestionSplit | None
    no_split: str

    @property
    def model(self) -> Any:
        return self.wrapped.model


def audit_context(
    wrapped: Wrapped,
    tokenizer: Any,
    spec: EvalSpec,
    *,
    before_scores: list[float] | None,
    after_scores: list[float] | None,
    max_length: int,
    after_evaluation: dict[str, Any] | None,
) -> AuditContext:
    """The audits' context: the scores cut to the questions the attacks use, split into
    attack and measured questions where there are enough and both sets of scores."""
    questions = forget_questions(spec)
    before_scores = before_scores[: len(questions)] if before_scores else before_scores
    after_scores = after_scores[: len(questions)] if after_scores else after_scores
    split = None
    if len(questions) >= MIN_ATTACK_QUESTIONS and before_scores and after_scores:
        indices = robustness.split_for_attack(
            len(questions), spec.robustness.relearn.fraction, spec.robustness.seed
        )
        split = QuestionSplit(questions, indices, before_scores, after_scores)
    no_split = (
        f"needs eval.forget_qa with at least {MIN_ATTACK_QUESTIONS} questions"
        if len(questions) < MIN_ATTACK_QUESTIONS
        else "needs the before and after forget KnowMem"
    )
    return AuditContext(
        wrapped, tokenizer, spec, max_length, before_scores, after_evaluation, split, no_split
    )


class AuditSettings(Protocol):
    """What every audit's settings have: `enabled` (None: on where the data allows it)."""

    @property
    def enabled(self) -> bool | None: ...


SettingsT = TypeVar("SettingsT", bound=AuditSettings)


@dataclass(frozen=True)
class Audit(Generic[SettingsT]):
    """One robustness audit: `name` keys its result and its eval.robustness settings,
    `settings` picks those out, `measure` runs it: {"status": "done", "settings": ...,
    figures} or {"status": "off", "reason": ...}."""

    name: str
    settings: Callable[[RobustnessSpec], SettingsT]
    measure: Callable[[AuditContext, SettingsT], dict[str, Any]]

    def run(self, ctx: AuditContext, robustness_spec: RobustnessSpec) -> dict[str, Any]:
        """The audit's result, off where its settings turn it off; a done one carries
        the seconds it took, last."""
        settings = self.settings(robustness_spec)
        if settings.enabled is False:
            return {"status": "off", "reason": f"eval.robustness.{self.name}.enabled is false"}
        started = time.monotonic()
        result = self.measure(ctx, settings)
        if result["status"] == "done":
            result["seconds"] = round(time.monotonic() - started, 2)
        return result
