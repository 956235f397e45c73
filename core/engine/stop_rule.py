"""The stop rule: forget and utility can fall together, and on small models collapse
within a few steps. With eval data, probe every K steps on small subsets, stop at the
forget target or before the utility budget is spent, and keep the best state within
budget. Its state travels with each checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.engine.data import load_records
from core.engine.evaluation import EvalSpec, knowmem, mc_accuracy, verbmem
from core.engine.events import Events
from core.engine.modeling import Wrapped
from core.engine.spec.parts import FORGET_TARGET_SETS


class StopRule:
    """Evaluate small probes every K steps; stop at the forget target or before the
    utility budget is spent, and keep the best state within budget.

    Forget probe: eval.forget_target_metric on the first N records of its set (KnowMem
    F1 on the forget questions by default, VerbMem F1 on the forget texts, or forget MC
    accuracy); utility probe: KnowMem F1 on the first N retain questions. "Best" = lowest
    forget score with utility >= (1 - budget) * utility before.
    """

    def __init__(
        self, wrapped: Wrapped, tokenizer: Any, spec: EvalSpec, every: int, events: Events
    ):
        self.wrapped, self.tokenizer, self.spec, self.every = wrapped, tokenizer, spec, every
        self.events = events
        files = spec.files()
        self.forget_set = FORGET_TARGET_SETS[spec.forget_target_metric]
        self.forget = load_records(files[self.forget_set]).items[: spec.probe_samples]
        self.retain = load_records(files["retain_qa"]).items[: spec.probe_samples]
        self.history: list[dict[str, float]] = []
        self.before = self.measure()
        # The initial state is always within budget: if the first probe already breaks it,
        # the job ends with the model unchanged rather than collapsed.
        self.best: dict[str, float] = {"step": 0, **self.before}
        self.best_state = self._snapshot()
        self.last_probed = 0

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Trainable weights, on the CPU (a LoRA adapter is small; full weights are not)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.wrapped.trainable().items()}

    def _forget_probe(self) -> float:
        """The forget target metric on the probe's records, as a 0-1 score."""
        model, spec = self.wrapped.model, self.spec
        metric = spec.forget_target_metric
        if metric == "verbmem":
            return verbmem(model, self.tokenizer, self.forget, batch_size=spec.batch_size)[
                "rouge_l_f1"
            ]
        if metric == "mc":
            accuracy = mc_accuracy(
                model,
                self.tokenizer,
                spec.files()[self.forget_set],
                limit=spec.probe_samples,
                batch_size=spec.batch_size,
                task_name="unlearn_probe_mc",
            )["accuracy"]
            return float(accuracy or 0.0)
        return knowmem(
            model,
            self.tokenizer,
            self.forget,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
        )["rouge_l_f1"]

    def measure(self) -> dict[str, float]:
        model = self.wrapped.model
        f = self._forget_probe()
        u = knowmem(
            model,
            self.tokenizer,
            self.retain,
            max_new_tokens=self.spec.max_new_tokens,
            batch_size=self.spec.batch_size,
        )["rouge_l_f1"]
        return {"forget": f, "utility": u}

    def check(self, step: int) -> str | None:
        if step % self.every:
            return None
        return self._probe(step)

    def _probe(self, step: int) -> str | None:
        self.last_probed = step
        now = self.measure()
        record = {"step": step, **now}
        self.history.append(record)
        self.events.probe(step, record)
        floor = (1 - self.spec.utility_budget) * self.before["utility"]
        if now["utility"] < floor:
            return (
                f"utility {now['utility']:.3f} fell below the budget floor {floor:.3f} "
                f"at step {step}"
            )
        if now["forget"] < self.best["forget"]:
            self.best = record
            self.best_state = self._snapshot()
        if now["forget"] <= self.spec.forget_target * self.before["forget"]:
            return f"forget target reached at step {step}"
        return None

    # The rule's state travels with each checkpoint, so a job resumed after a kill keeps
    # the best state found before it. Without it, a job killed after the rule stopped it
    # (while evaluating or uploading) resumed at its end and restored the initial model.
    STATE, BEST = "stop_rule.json", "stop_rule_best.safetensors"

    def save(self, directory: Path) -> None:
        """Write the probes so far and the best state into a checkpoint being made (the
        best weights only when the best is not the initial state, which a resumed job
        has before its checkpoint is loaded)."""
        state = {
            "before": self.before,
            "history": self.history,
            "best": self.best,
            "last_probed": self.last_probed,
        }
        (directory / self.STATE).write_text(json.dumps(state))
        if self.best["step"] != 0:
            save_file(
                {n: t.contiguous() for n, t in self.best_state.items()}, directory / self.BEST
            )

    def load(self, directory: Path) -> None:
        """Take up the state a checkpoint holds (none in checkpoints of before it did)."""
        if not (directory / self.STATE).is_file():
            return
        state = json.loads((directory / self.STATE).read_text())
        self.before, self.history, self.best = state["before"], state["history"], state["best"]
        self.last_probed = state["last_probed"]
        if self.best["step"] != 0:
            self.best_state = load_file(directory / self.BEST)

    def finish(self, final_step: int) -> dict[str, Any]:
        """Probe the final state if needed, then restore the best state within budget."""
        if self.last_probed != final_step:
            self._probe(final_step)
        restored = None
        if self.best["step"] != final_step:
            trainable = self.wrapped.trainable()
            with torch.no_grad():
                for name, tensor in self.best_state.items():
                    trainable[name].copy_(tensor)
            restored = self.best["step"]
        return {
            "forget_metric": self.spec.forget_target_metric,
            "before": self.before,
            "history": self.history,
            "best": self.best,
            "restored_step": restored,
        }


def probe_every(spec_eval: EvalSpec | None, steps: int) -> int | None:
    """The stop rule is on when eval data has retain questions and the set of the forget
    target metric (forget questions by default; every ~5% of the run unless probe_every
    says otherwise); off without eval data."""
    if spec_eval is None or not spec_eval.retain_qa:
        return None
    if not getattr(spec_eval, FORGET_TARGET_SETS[spec_eval.forget_target_metric]):
        return None
    return spec_eval.probe_every or max(1, steps // 20)
