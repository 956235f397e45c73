"""Distillation after unlearning (UNDO, arXiv 2506.06278): shrink-and-perturb toward a
seeded fresh initialisation, then distil the unlearned teacher into the student on data
without the forget set. A fine-tune on forget facts finds the knowledge in weights that
still hold it; a student that was moved away from them and learnt only the teacher's
outputs on other data has less of it to find.

Memory: the teacher (a frozen copy of the unlearned model) and the student with its
gradient and AdamW state are on the device together: about 2 + 2 + 8 (+ 4 fp32 masters
of bf16 weights) bytes per parameter beside the activations, and a fresh model for the
initialisation, briefly, on the CPU.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from core.engine.data import Example
from core.engine.events import Events, StepInfo
from core.engine.spec.robust import RobustifySpec
from core.engine.train_step import BatchStream, TrainedWeights, TrainState, apply_update

log = logging.getLogger(__name__)

# --- shrink and perturb --------------------------------------------------------


def fresh_init(model: Any, seed: int) -> Any:
    """A freshly initialised model of `model`'s architecture and dtype, on the CPU, from
    `seed` alone (the global RNG is left as it was)."""
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)._from_config(copy.deepcopy(model.config), torch_dtype=dtype)
    return fresh.eval()


@torch.no_grad()
def interpolate(model: torch.nn.Module, init: torch.nn.Module, alpha: float) -> None:
    """Every parameter w of `model` becomes (1 - alpha) w + alpha w_init, in place, with
    w_init the same-named parameter of `init`; buffers stay as they are."""
    targets = dict(init.named_parameters())
    for name, param in model.named_parameters():
        start = targets[name].to(device=param.device, dtype=param.dtype)
        param.mul_(1 - alpha).add_(start, alpha=alpha)


def shrink_and_perturb(model: Any, alpha: float, seed: int) -> None:
    """The student's start: `model`'s weights a share `alpha` of the way to a fresh
    initialisation seeded with `seed` (alpha 0: unchanged; 1: the fresh init)."""
    init = fresh_init(model, seed)
    interpolate(model, init, alpha)
    del init


# --- the distillation loss -----------------------------------------------------


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 1 where logits[:, t] predict a real token (t + 1 is a real token)."""
    mask = torch.zeros_like(attention_mask)
    mask[:, :-1] = attention_mask[:, 1:]
    return mask


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Forward KL[teacher || student] of the next-token distributions, mean over the
    positions where mask [B, T] is 1. logits: [B, T, V]; the teacher's are detached.
    KL = sum_v p_t(v) (log p_t(v) - log p_s(v))."""
    teacher_logp = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    per_position = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [B, T]
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1)


# --- the loop ------------------------------------------------------------------


@dataclass
class DistillResult:
    steps_done: int
    total_steps: int
    history: list[StepInfo] = field(default_factory=list)
    stop_reason: str | None = None
    teacher: dict[str, float] | None = None  # the watch's probe of the teacher
    probes: list[dict[str, float]] = field(default_factory=list)


class Watch:
    """The utility stop rule for a student: probe KnowMem on forget and retain questions
    every `every` steps; stop once the student's utility is within `budget` of the
    teacher's, measured once at the start."""

    def __init__(self, tokenizer: Any, spec: Any, every: int, events: Events) -> None:
        from core.engine.data import load_records

        files = spec.files()
        self.tokenizer, self.spec, self.every, self.events = tokenizer, spec, every, events
        self.forget = load_records(files["forget_qa"]).items[: spec.probe_samples]
        self.retain = load_records(files["retain_qa"]).items[: spec.probe_samples]
        self.teacher: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def measure(self, model: Any) -> dict[str, float]:
        from core.engine.evaluation import knowmem

        def f1(records: list[dict[str, Any]]) -> float:
            return float(
                knowmem(
                    model,
                    self.tokenizer,
                    records,
                    max_new_tokens=self.spec.max_new_tokens,
                    batch_size=self.spec.batch_size,
                )["rouge_l_f1"]
            )

        was_training = model.training
        model.eval()
        try:
            return {"forget": f1(self.forget), "utility": f1(self.retain)}
        finally:
            model.train(was_training)

    def check(self, step: int, model: Any) -> str | None:
        if step % self.every:
            return None
        now = {"step": float(step), **self.measure(model)}
        self.history.append(now)
        self.events.probe(step, now)
        floor = (1 - self.spec.utility_budget) * self.teacher["utility"]
        if now["utility"] >= floor:
            return f"utility {now['utility']:.3f} within budget of the teacher's at step {step}"
        return None


def _batches(stream: BatchStream, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    index = 0
    while True:
        yield {k: v.to(device) for k, v in stream.batch(index).items()}
        index += 1


def distill(
    student: Any,
    teacher: Any,
    examples: list[Example],
    options: RobustifySpec,
    *,
    pad_id: int,
    events: Events | None = None,
    watch: Watch | None = None,
) -> DistillResult:
    """Train every parameter of `student` toward `teacher`'s next-token distributions on
    `examples` (options.steps AdamW steps at options.learning_rate, batches of
    options.batch_size in a seeded order), in place; with a `watch`, stop once the
    student's utility is back within budget of the teacher's."""
    events = events or Events()
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    student.requires_grad_(True).train()
    weights = TrainedWeights(dict(student.named_parameters()), masters=True)
    optimizer = torch.optim.AdamW(weights.trainable, lr=options.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    trained = TrainState(student, weights, optimizer, scheduler)
    result = DistillResult(0, options.steps)
    if watch is not None:
        watch.teacher = watch.measure(teacher)
    batches = _batches(BatchStream(examples, options.batch_size, options.seed, pad_id), device)
    started = time.monotonic()
    for step in range(1, options.steps + 1):
        if events.should_cancel():
            from core.errors import JobCancelled

            raise JobCancelled(f"cancelled at distillation step {step - 1} of {options.steps}")
        batch = next(batches)
        mask = next_token_mask(batch["attention_mask"])
        with torch.no_grad():
            teacher_logits = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        loss = distill_kl(logits, teacher_logits, mask)
        loss.backward()
        learning_rate = apply_update(trained, options.max_grad_norm)
        info = _step_info(step, options.steps, float(loss.detach()), learning_rate, started)
        result.history.append(info)
        result.steps_done = step
        events.step(info)
        reason = watch.check(step, student) if watch is not None else None
        if reason is not None:
            result.stop_reason = reason
            break
    student.eval()
    if watch is not None:
        result.teacher, result.probes = watch.teacher, watch.history
    return result


def _step_info(
    step: int, steps: int, loss: float, learning_rate: float, started: float
) -> StepInfo:
    elapsed = time.monotonic() - started
    return StepInfo(
        step=step,
        total_steps=steps,
        loss=loss,
        terms={"distill_kl": loss},
        learning_rate=learning_rate,
        tokens_per_second=0.0,
        eta_seconds=elapsed / step * (steps - step),
    )
