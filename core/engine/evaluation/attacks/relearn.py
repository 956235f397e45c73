"""The relearning attack as a sweep: the attacker holds the weights, so each cell
fine-tunes every weight of a copy of the unlearned model (a LoRA adapter merged,
core.engine.evaluation.robustness.attacker_copy) at one learning rate, for one budget of
steps, on one kind of attack data (the attack split of the forget questions, or of
eval.forget_text), and measures what came back: forget KnowMem on the measured questions,
forget VerbMem on the texts no cell trains on, forget MC on the facts the attack
questions do not name, neighbour KnowMem. The recovery is the worst cell's, and the cell
is named. A reference model (`reference_sweep`) goes through the same cells: what the
attack teaches a model that never knew, beside what it brings back to the job's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.engine.data import Records, load_records
from core.engine.evaluation import robustness
from core.engine.evaluation.attacks.context import (
    AuditContext,
    QuestionSplit,
    forget_questions,
    forget_texts,
    knowmem_figures,
    mc_after,
    mc_items_not_of,
    neighbor_questions,
)
from core.engine.evaluation.metrics import mc_accuracy, verbmem
from core.engine.spec.parts import EvalSpec, RelearnCell, RelearnSpec

Select = Callable[[dict[str, Any]], bool]
TRAINS = "every weight, on a copy of the model (a LoRA adapter merged)"
# the figures each cell reports, where the eval set is there
FIGURES = ("forget_knowmem_f1", "forget_verbmem_f1", "forget_mc_accuracy", "neighbor_knowmem_f1")


@dataclass(frozen=True)
class Targets:
    """What the cells train on and what each measurement scores: the QA attack split,
    the texts split the same way (the measured texts are scored, never trained on), the
    forget MC items kept (`mc_select`), the neighbour questions."""

    spec: EvalSpec
    attack_questions: list[dict[str, Any]]
    measured_questions: list[dict[str, Any]]
    attack_texts: list[dict[str, Any]]
    measured_texts: list[dict[str, Any]]
    measured_text_indices: list[int]
    mc_select: Select | None
    neighbors: list[dict[str, Any]]

    def attack_records(self, data: str) -> Records:
        if data == "text":
            return Records("text", self.attack_texts)
        return Records("qa", self.attack_questions)


def targets_for(spec: EvalSpec, questions: list[dict[str, Any]], split: Any) -> Targets:
    """The targets of a sweep on these questions split as `split` (an AttackSplit)."""
    texts = forget_texts(spec)
    if len(texts) >= 2:
        cut = robustness.split_for_attack(
            len(texts), spec.robustness.relearn.fraction, spec.robustness.seed
        )
        attack_texts, measured = [texts[i] for i in cut.attack], cut.measured
    else:
        attack_texts, measured = [], list(range(len(texts)))
    attack_questions = [questions[i] for i in split.attack]
    return Targets(
        spec,
        attack_questions,
        [questions[i] for i in split.measured],
        attack_texts,
        [texts[i] for i in measured],
        measured,
        mc_items_not_of(spec, attack_questions),
        neighbor_questions(spec),
    )


def _mc(model: Any, tokenizer: Any, targets: Targets) -> dict[str, Any]:
    spec = targets.spec
    return mc_accuracy(
        model,
        tokenizer,
        spec.forget_mc or "",
        limit=spec.max_samples,
        batch_size=spec.batch_size,
        task_name="unlearn_relearn_mc",
        select=targets.mc_select,
    )


def measure(model: Any, tokenizer: Any, targets: Targets) -> dict[str, Any]:
    """Each of FIGURES on the model now, where its eval set is there."""
    spec = targets.spec
    out: dict[str, Any] = {
        "forget_knowmem_f1": knowmem_figures(model, tokenizer, spec, targets.measured_questions)[
            "rouge_l_f1"
        ]
    }
    if targets.measured_texts:
        out["forget_verbmem_f1"] = verbmem(
            model, tokenizer, targets.measured_texts, batch_size=spec.batch_size
        )["rouge_l_f1"]
    if spec.forget_mc:
        out["forget_mc_accuracy"] = _mc(model, tokenizer, targets)["accuracy"]
    if targets.neighbors:
        out["neighbor_knowmem_f1"] = knowmem_figures(model, tokenizer, spec, targets.neighbors)[
            "rouge_l_f1"
        ]
    return out


def _groups(cells: list[RelearnCell]) -> dict[tuple[str, float], list[int]]:
    """The cells' budgets by (data, learning rate): one fine-tune per group, measured at
    each budget (a shorter budget is the longer one's prefix)."""
    groups: dict[tuple[str, float], list[int]] = {}
    for cell in cells:
        groups.setdefault((cell.data, cell.learning_rate), []).append(cell.steps)
    return groups


def _attack(
    model: Any,
    tokenizer: Any,
    targets: Targets,
    records: Records,
    budgets: list[int],
    **training: Any,
) -> tuple[dict[int, dict[str, Any]], list[float]]:
    """One fine-tune of a fresh attacker copy of `model` on `records`, measured after
    each budget of steps: the figures by budget, and the step losses."""
    attacker = robustness.attacker_copy(model)
    figures: dict[int, dict[str, Any]] = {}

    def at_step(step: int) -> None:
        figures[step] = measure(attacker, tokenizer, targets)

    # the copy goes with this frame: the next group's copy does not sit beside it
    losses = robustness.finetune(
        attacker, tokenizer, records, steps=budgets, at_step=at_step, **training
    )
    return figures, losses


def sweep(
    model: Any,
    tokenizer: Any,
    targets: Targets,
    cells: list[RelearnCell],
    *,
    batch_size: int,
    max_length: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Each cell's figures after its fine-tune of a fresh attacker copy of `model` (left
    as it is), or why it did not run; keyed by the cell's name."""
    out: dict[str, dict[str, Any]] = {}
    for (data, learning_rate), budgets in _groups(cells).items():
        records = targets.attack_records(data)
        if not records.items:
            for steps in budgets:
                name = RelearnCell(learning_rate=learning_rate, steps=steps, data=data).name
                out[name] = {"status": "off", "reason": "needs eval.forget_text with 2 texts"}
            continue
        figures, losses = _attack(
            model,
            tokenizer,
            targets,
            records,
            budgets,
            learning_rate=learning_rate,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
        )
        for steps in budgets:
            name = RelearnCell(learning_rate=learning_rate, steps=steps, data=data).name
            out[name] = {
                "status": "done",
                **figures[steps],
                "loss": round(losses[steps - 1], 4),
            }
    return out


def _subset_mean(values: list[float] | None, indices: list[int]) -> float | None:
    if not values or not indices or max(indices) >= len(values):
        return None
    return sum(float(values[i]) for i in indices) / len(indices)


def _after(ctx: AuditContext, split: QuestionSplit, targets: Targets) -> dict[str, Any]:
    """FIGURES of the unlearned model before any attack: from the after evaluation's
    per-record values where it has them for these records, else measured."""
    after = ctx.after_evaluation or {}
    out: dict[str, Any] = {"forget_knowmem_f1": split.after}
    if targets.measured_texts:
        value = _subset_mean(
            (after.get("forget_verbmem") or {}).get("per_sample_f1"),
            targets.measured_text_indices,
        )
        out["forget_verbmem_f1"] = value
    if ctx.spec.forget_mc:
        mc = mc_after(ctx.after_evaluation, ctx.spec, targets.mc_select)
        out["forget_mc_accuracy"] = None if mc is None else mc["accuracy"]
    if targets.neighbors:
        values = (after.get("neighbor_knowmem") or {}).get("per_sample_f1")
        out["neighbor_knowmem_f1"] = _subset_mean(values, list(range(len(targets.neighbors))))
    if any(value is None for value in out.values()):
        measured = measure(ctx.model, ctx.tokenizer, targets)
        out = {key: measured[key] if value is None else value for key, value in out.items()}
    return out


def _rows(
    cells: list[RelearnCell],
    figures: dict[str, dict[str, Any]],
    split: QuestionSplit,
    targets: Targets,
) -> list[dict[str, Any]]:
    """One row per cell: its settings, its figures and its recovery."""
    rows = []
    for cell in cells:
        row: dict[str, Any] = {
            "cell": cell.name,
            "data": cell.data,
            "learning_rate": cell.learning_rate,
            "steps": cell.steps,
            "attack_records": len(targets.attack_records(cell.data).items),
            **figures[cell.name],
        }
        if row["status"] == "done":
            row["recovery"] = robustness.recovery(
                split.before, split.after, row["forget_knowmem_f1"]
            )
        rows.append(row)
    return rows


def worst_cell(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cell with the highest recovery (where unlearning removed nothing, the highest
    forget KnowMem after the attack); None when no cell ran."""
    done = [row for row in rows if row["status"] == "done"]
    if not done:
        return None
    if any(row["recovery"] is not None for row in done):
        return max(
            (row for row in done if row["recovery"] is not None), key=lambda r: r["recovery"]
        )
    return max(done, key=lambda row: row["forget_knowmem_f1"])


def _settings(
    settings: RelearnSpec, split: QuestionSplit, targets: Targets, worst: dict[str, Any]
) -> dict[str, Any]:
    return {
        "sweep": settings.preset
        if settings.cells is None
        and settings.grid is None
        and settings.steps is None
        and settings.learning_rate is None
        else "as specified",
        "fraction": settings.fraction,
        "attack_questions": len(split.indices.attack),
        "measured_questions": len(split.indices.measured),
        "attack_texts": len(targets.attack_texts),
        "measured_texts": len(targets.measured_texts),
        "neighbor_questions": len(targets.neighbors),
        "steps": worst["steps"],
        "learning_rate": worst["learning_rate"],
        "data": worst["data"],
        "batch_size": settings.batch_size,
        "trains": TRAINS,
        "seed": targets.spec.robustness.seed,
    }


def relearn_audit(ctx: AuditContext, settings: RelearnSpec) -> dict[str, Any]:
    """Every cell of the sweep on the unlearned model (left as it was found), its
    figures beside the unattacked ones, and the worst cell's recovery as the audit's."""
    split = ctx.split
    if split is None:
        return {"status": "off", "reason": ctx.no_split}
    targets = targets_for(ctx.spec, split.questions, split.indices)
    cells = settings.sweep()
    figures = sweep(
        ctx.model,
        ctx.tokenizer,
        targets,
        cells,
        batch_size=settings.batch_size,
        max_length=ctx.max_length,
        seed=ctx.spec.robustness.seed,
    )
    rows = _rows(cells, figures, split, targets)
    worst = worst_cell(rows)
    if worst is None:
        return {"status": "off", "reason": "no cell could run: " + rows[0]["reason"]}
    after = _after(ctx, split, targets)
    result: dict[str, Any] = {
        "status": "done",
        "settings": _settings(settings, split, targets, worst),
        "worst_cell": worst["cell"],
        "forget_knowmem_f1": {
            "before": split.before,
            "after": split.after,
            "after_attack": worst["forget_knowmem_f1"],
        },
        "recovery": worst["recovery"],
        "after": after,
        "cells": rows,
    }
    if "forget_mc_accuracy" in worst:
        result["forget_mc"] = {
            "scope": "the items of the facts the attack questions do not name"
            if targets.mc_select is not None
            else "the whole forget MC set",
            "items": _mc_items(ctx.spec, targets.mc_select),
            "after": after.get("forget_mc_accuracy"),
            "after_attack": worst["forget_mc_accuracy"],
        }
    return result


def _mc_items(spec: EvalSpec, select: Select | None) -> int:
    """How many forget MC items the attack is measured on."""
    items = load_records(spec.forget_mc or "").items[: spec.max_samples]
    return sum(1 for item in items if select is None or select(item))


def reference_sweep(
    reference: Any, tokenizer: Any, spec: EvalSpec, relearn: dict[str, Any], *, max_length: int
) -> None:
    """The reference model (left as it is) through the cells the job's sweep ran: each
    cell of `relearn` (the job's relearn audit) gets the reference's figures after the
    same attack, and the audit the reference's unattacked ones (`reference_after`)."""
    if relearn.get("status") != "done":
        return
    questions = forget_questions(spec)
    split = robustness.split_for_attack(
        len(questions), spec.robustness.relearn.fraction, spec.robustness.seed
    )
    targets = targets_for(spec, questions, split)
    rows = [row for row in relearn["cells"] if row["status"] == "done"]
    cells = [
        RelearnCell(**{key: row[key] for key in ("learning_rate", "steps", "data")}) for row in rows
    ]
    figures = sweep(
        reference,
        tokenizer,
        targets,
        cells,
        batch_size=spec.robustness.relearn.batch_size,
        max_length=max_length,
        seed=spec.robustness.seed,
    )
    for row in rows:
        row["reference"] = {key: figures[row["cell"]].get(key) for key in FIGURES if key in row}
    relearn["reference_after"] = measure(reference, tokenizer, targets)
