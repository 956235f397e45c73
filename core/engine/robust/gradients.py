"""The step's gradient with the robust options (core.engine.spec.robust): the forget
term's gradient, taken at the relearned weights on attack steps (attack_loop) and made
selective (selective), then the retain term's added at the weights themselves.

Without either option the loop uses core.engine.train_step's plain gradient; the sum is
the same, only the order of the backward passes differs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from core.engine.robust.attack_loop import relearned
from core.engine.robust.selective import (
    captured_inputs,
    linear_modules,
    mask_gradients,
    project_gradients,
)
from core.engine.spec.methods import TrainingParams
from core.engine.spec.robust import SelectiveParams
from core.engine.train_step import MicroBatches, StepMean


def attack_due(params: TrainingParams, step: int) -> bool:
    attack = params.attack_in_loop
    return attack is not None and step % attack.every == 0


def robust_gradients(
    batches: MicroBatches,
    indices: list[int],
    named: dict[str, torch.nn.Parameter],
    params: TrainingParams,
    step: int,
) -> tuple[float, dict[str, float]]:
    """Backpropagate step `step` (from 1): the forget gradient (at the relearned weights
    on an attack step), made selective, then retain_weight times the retain term's
    gradient at the weights; returns the step's mean loss and terms."""
    mean = StepMean(params.gradient_accumulation_steps)
    attack = params.attack_in_loop
    around: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if attack is not None and attack_due(params, step):
        first = (step // attack.every - 1) * attack.steps  # the attacker's batches so far

        def attack_loss(attack_step: int) -> torch.Tensor:
            return batches.attack_loss(first + attack_step)

        around = relearned(named, attack_loss, attack.lr, attack.steps)
    with around:
        for index in indices:
            loss, terms = batches.forget_loss(index)
            (loss / mean.accumulation).backward()
            mean.add(float(loss.detach()), terms)
    if params.selective is not None:
        select(batches, indices, named, params.selective, mean.accumulation)
    for index in indices:
        retained = batches.retain_loss(index)
        if retained is None:
            continue
        term, terms = retained
        (params.retain_weight * term / mean.accumulation).backward()
        mean.add(params.retain_weight * float(term.detach()), terms)
    return mean.loss, mean.terms


def select(
    batches: MicroBatches,
    indices: list[int],
    named: dict[str, torch.nn.Parameter],
    options: SelectiveParams,
    accumulation: int,
) -> None:
    """The forget gradient in .grad projected (CIR) and/or masked (MUDMAN) with the
    step's retain micro-batches."""
    if options.mode in ("project", "both"):
        model = batches.wrapped.model
        layers = linear_modules(model, named)
        current: dict[str, torch.Tensor] = {}
        with captured_inputs(layers, lambda: current["mask"], options.max_rows) as kept:
            with torch.no_grad():
                for index in indices:
                    batch = batches.retain_batch(index)
                    current["mask"] = batch["attention_mask"]
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        project_gradients(named, kept, options.components)
    if options.mode in ("mask", "both"):
        forget: dict[str, Any] = {}
        for name, param in named.items():
            forget[name], param.grad = param.grad, None
        for index in indices:
            (batches.retain_nll(index) / accumulation).backward()
        retain = {name: param.grad for name, param in named.items()}
        for name, param in named.items():
            param.grad = forget[name]
        mask_gradients(named, retain)
