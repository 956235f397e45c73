"""The unlearning loop: setup, steps, save. Reads top to bottom; one step's parts (the
micro-batches' losses, the gradient, the update) are in core.engine.train_step.

Data order is a pure function of (seed, epoch), so a run resumed from a checkpoint
at step N sees exactly the batches an uninterrupted run would: micro-batch i of the
whole run is batch (i mod batches_per_epoch) of epoch (i div batches_per_epoch) under
that epoch's seeded permutation. Checkpoints (core.engine.checkpoint) store the
trainable weights, the AdamW and scheduler state and the RNG state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.optim.lr_scheduler import LRScheduler

from core.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from core.engine.data import Example
from core.engine.events import Events, StepInfo
from core.engine.modeling import Wrapped
from core.engine.robust.gradients import robust_gradients
from core.engine.spec.methods import Method, TrainingParams, prepare
from core.engine.train_step import (
    BatchStream,
    MicroBatches,
    TrainedWeights,
    TrainState,
    apply_update,
    step_gradients,
)
from core.errors import JobCancelled, SpecError

if TYPE_CHECKING:
    from core.engine.stop_rule import StopRule

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    steps_done: int
    total_steps: int
    history: list[StepInfo] = field(default_factory=list)
    stopped_early: bool = False
    stop_reason: str | None = None
    # a sharded run's: each rank's peak memory (core.engine.modeling.peak_memory)
    ranks_peak_memory: list[dict[str, int | None]] | None = None


class Shard(Protocol):
    """This process as one rank of a sharded run (core.engine.sharded.Shard)."""

    def mine(self, indices: list[int]) -> list[int]: ...

    def total(self, loss: float, terms: dict[str, float]) -> tuple[float, dict[str, float]]: ...

    def save(
        self,
        root: Path,
        step: int,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        *,
        fingerprint: str | None,
        stop_reason: str | None = None,
    ) -> Path: ...

    def load(
        self, path: Path, model: Any, optimizer: Any, scheduler: Any, fingerprint: str | None
    ) -> tuple[int, str | None]: ...


# --- the loop -----------------------------------------------------------------


def run_unlearning(
    wrapped: Wrapped,
    method: Method,
    params: TrainingParams,
    forget: list[Example],
    *,
    pad_id: int,
    retain: list[Example] | None = None,
    contrast: list[Example] | None = None,
    contrast_paired: bool = True,
    checkpoint_dir: Path | None = None,
    events: Events | None = None,
    stop_rule: StopRule | None = None,
    fingerprint: str | None = None,
    shard: Shard | None = None,
) -> LoopResult:
    """Unlearn `forget` from `wrapped.model`, in place. Resumes from checkpoint_dir if it
    holds a checkpoint of this run (`fingerprint`: run_fingerprint's, computed here when
    not given). Reports through `events`; raises JobCancelled when events.should_cancel()
    turns True. With a `stop_rule`, it is checked after every step and its state goes
    into every checkpoint. `contrast` (FLAT's expected responses) is drawn with the
    forget set's seed when `contrast_paired` (example i answers forget example i), so
    each forget batch meets its own pairs; else as a stream of its own. With a `shard`
    (core.engine.sharded: this process is one rank of an FSDP2 job), it runs its share of
    each step's micro-batches, reports the step's totals over all ranks, and checkpoints
    through the shard; the stop rule does not run there."""
    events = events or Events()
    model = wrapped.model
    _check_inputs(method, params, forget, retain, contrast, contrast_paired, stop_rule, shard)

    # --- setup
    seed_everything(params.seed)
    state = prepare(wrapped, method, params)  # what trains may change here (RMU)
    steps = total_steps(params, len(forget))
    # sharded, the shards are the masters already (core.engine.sharded.shard_model)
    weights = TrainedWeights(wrapped.trainable(), masters=params.master_weights and shard is None)
    optimizer = torch.optim.AdamW(
        weights.trainable, lr=params.learning_rate, weight_decay=params.weight_decay
    )
    trained = TrainState(model, weights, optimizer, _make_scheduler(optimizer, params, steps))
    batches = _micro_batches(
        wrapped, method, params, state, pad_id, forget, retain, contrast, contrast_paired
    )
    checkpoints = None
    if checkpoint_dir is not None:
        if fingerprint is None:
            fingerprint = run_fingerprint(method, params, wrapped, forget, retain, contrast)
        every = _checkpoint_every(params, steps)
        checkpoints = _Checkpoints(checkpoint_dir, every, fingerprint, stop_rule, shard, trained)
    result = checkpoints.resume(steps, events) if checkpoints else LoopResult(0, steps)
    start_step = result.steps_done
    # a run its stop rule ended is over: resumed from its last checkpoint, it trains no more
    last_step = start_step if result.stop_reason else steps
    # checkpointing is switched off again however the loop ends (a cancel raises)
    with _gradient_checkpointing(model, params.gradient_checkpointing):
        model.train()
        clock = _Clock(start_step, steps)

        # --- steps
        for step in range(start_step + 1, last_step + 1):
            if events.should_cancel():
                raise JobCancelled(f"cancelled at step {step - 1} of {steps}")
            info = _train_step(step, batches, trained, params, shard, clock)
            result.history.append(info)
            result.steps_done = step
            events.step(info)
            reason = _stop_or_checkpoint(step, steps, stop_rule, checkpoints, events)
            if reason is not None:
                result.stopped_early, result.stop_reason = True, reason
                break

        # --- save
        if checkpoints is not None and result.steps_done > start_step:
            events.checkpoint(checkpoints.save(result.steps_done, result.stop_reason))
    model.eval()
    return result


def _check_inputs(
    method: Method,
    params: TrainingParams,
    forget: list[Example],
    retain: list[Example] | None,
    contrast: list[Example] | None,
    contrast_paired: bool,
    stop_rule: StopRule | None,
    shard: Shard | None,
) -> None:
    """ValueError for data the method needs and was not given, before anything trains."""
    if (params.retain_loss != "none" or method.needs_retain) and not retain:
        raise ValueError(f"{method.id} with retain_loss {params.retain_loss} needs retain examples")
    if method.uses_contrast and not contrast:
        raise ValueError(f"{method.id} needs contrast examples")
    if contrast_paired and contrast is not None and len(contrast) != len(forget):
        raise ValueError("paired contrast examples must be as many as the forget examples")
    if shard is not None and stop_rule is not None:
        raise ValueError("the stop rule does not run in a sharded loop")
    robust = params.selective is not None or params.attack_in_loop is not None
    if robust and (method.step_loss is not None or shard is not None):
        raise ValueError(
            "selective and attack_in_loop need a method whose loss is its forget term "
            f"({method.id} has a step loss of its own) on one device"
        )
    if params.selective is not None and not retain:
        raise ValueError("selective updates need retain examples")


def _micro_batches(
    wrapped: Wrapped,
    method: Method,
    params: TrainingParams,
    state: Any,
    pad_id: int,
    forget: list[Example],
    retain: list[Example] | None,
    contrast: list[Example] | None,
    contrast_paired: bool,
) -> MicroBatches:
    """Each set as a stream of its own seed; paired contrast examples share the forget
    set's, so contrast batch i holds the answers to forget batch i."""
    contrast_seed = params.seed if contrast_paired else params.seed + 2
    return MicroBatches(
        wrapped,
        method,
        params,
        state,
        device=next(wrapped.model.parameters()).device,
        forget=BatchStream(forget, params.batch_size, params.seed, pad_id),
        retain=BatchStream(retain, params.batch_size, params.seed + 1, pad_id) if retain else None,
        contrast=(
            BatchStream(contrast, params.batch_size, contrast_seed, pad_id) if contrast else None
        ),
        attack=_attack_stream(params, forget, pad_id),
    )


def _attack_stream(
    params: TrainingParams, forget: list[Example], pad_id: int
) -> BatchStream | None:
    """The attack in the loop's split: a fixed share of the forget set, drawn with the
    run's seed, as a stream of its own."""
    if params.attack_in_loop is None:
        return None
    share = params.attack_in_loop.split
    count = max(1, math.ceil(share * len(forget)))
    generator = torch.Generator().manual_seed(params.seed * 100_003 + 7)
    chosen = torch.randperm(len(forget), generator=generator)[:count].tolist()
    split = [forget[i] for i in sorted(chosen)]
    return BatchStream(split, params.batch_size, params.seed + 3, pad_id)


def _train_step(
    step: int,
    batches: MicroBatches,
    trained: TrainState,
    params: TrainingParams,
    shard: Shard | None,
    clock: _Clock,
) -> StepInfo:
    """Optimizer step `step` (from 1) on the run's micro-batches (step - 1) * accumulation
    onwards: sharded, this rank's share of them, with the loss and terms summed over the
    ranks."""
    accumulation = params.gradient_accumulation_steps
    indices = [(step - 1) * accumulation + micro for micro in range(accumulation)]
    clock.tokens_seen += batches.forget_tokens(indices)  # every rank's, for the run's throughput
    if shard is not None:
        indices = shard.mine(indices)
    if params.selective is not None or params.attack_in_loop is not None:
        loss, terms = robust_gradients(batches, indices, trained.weights.named, params, step)
    else:
        loss, terms = step_gradients(batches, indices, trained.weights.named, params)
    if shard is not None:
        loss, terms = shard.total(loss, terms)
    learning_rate = apply_update(trained, params.max_grad_norm)
    return clock.step_info(step, loss, terms, learning_rate)


class _Clock:
    """Throughput and time left, over the steps this process has run (from a resume)."""

    def __init__(self, start_step: int, steps: int) -> None:
        self.start_step, self.steps = start_step, steps
        self.started = time.monotonic()
        self.tokens_seen = 0

    def step_info(
        self, step: int, loss: float, terms: dict[str, float], learning_rate: float
    ) -> StepInfo:
        elapsed = time.monotonic() - self.started
        return StepInfo(
            step=step,
            total_steps=self.steps,
            loss=loss,
            terms=terms,
            learning_rate=learning_rate,
            tokens_per_second=self.tokens_seen / elapsed if elapsed > 0 else 0.0,
            eta_seconds=elapsed / (step - self.start_step) * (self.steps - step),
        )


# --- stopping and checkpoints --------------------------------------------------


def _stop_or_checkpoint(
    step: int,
    steps: int,
    stop_rule: StopRule | None,
    checkpoints: _Checkpoints | None,
    events: Events,
) -> str | None:
    """After `step`: the stop rule's reason to end the run here, if it gives one (the
    final save then checkpoints this step with it); else a checkpoint when one is due."""
    reason = stop_rule.check(step) if stop_rule is not None else None
    if reason is None and checkpoints is not None and checkpoints.due(step, steps):
        events.checkpoint(checkpoints.save(step))
    return reason


def _checkpoint_every(params: TrainingParams, steps: int) -> int:
    """Without an explicit cadence, a run with a checkpoint directory saves about every
    10% of its steps, so a killed worker loses at most a tenth of the work."""
    return params.checkpoint_every or max(1, steps // 10)


@dataclass
class _Checkpoints:
    """This run's checkpoints in `directory`: through the shard when sharded, else the
    weights AdamW updates (the fp32 masters) and the stop rule's state."""

    directory: Path
    every: int
    fingerprint: str | None
    stop_rule: StopRule | None
    shard: Shard | None
    trained: TrainState

    def resume(self, steps: int, events: Events) -> LoopResult:
        """The run as its latest checkpoint left it, restored; a fresh run without one."""
        path, trained = latest_checkpoint(self.directory), self.trained
        if path is None:
            return LoopResult(0, steps)
        if self.shard is not None:
            step, stop_reason = self.shard.load(
                path, trained.model, trained.optimizer, trained.scheduler, self.fingerprint
            )
        else:
            step, stop_reason = load_checkpoint(
                path,
                trained.weights.optimized,
                trained.optimizer,
                trained.scheduler,
                self.fingerprint,
            )
        trained.weights.masters_into_model()
        log.info("resumed from %s at step %d of %d", path, step, steps)
        if self.stop_rule is not None:
            self.stop_rule.load(path)
        events.resumed(step)
        return LoopResult(
            step, steps, stopped_early=stop_reason is not None, stop_reason=stop_reason
        )

    def due(self, step: int, steps: int) -> bool:
        """A periodic checkpoint after `step`; the last step's is the final save."""
        return step % self.every == 0 and step < steps

    def save(self, step: int, stop_reason: str | None = None) -> Path:
        trained = self.trained
        if self.shard is not None:
            return self.shard.save(
                self.directory,
                step,
                trained.model,
                trained.optimizer,
                trained.scheduler,
                fingerprint=self.fingerprint,
                stop_reason=stop_reason,
            )
        return save_checkpoint(
            self.directory,
            step,
            trained.weights.optimized,
            trained.optimizer,
            trained.scheduler,
            stop_reason=stop_reason,
            fingerprint=self.fingerprint,
            extra=self.stop_rule.save if self.stop_rule is not None else None,
        )


# --- schedules and activation checkpointing --------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def total_steps(params: TrainingParams, n_examples: int) -> int:
    """max_steps when given, else ceil(epochs * batches per epoch / accumulation)."""
    if params.max_steps is not None:
        return params.max_steps
    batches_per_epoch = math.ceil(n_examples / params.batch_size)
    return max(1, math.ceil(params.epochs * batches_per_epoch / params.gradient_accumulation_steps))


def _make_scheduler(
    optimizer: torch.optim.Optimizer, params: TrainingParams, steps: int
) -> LRScheduler:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        name[params.lr_scheduler],
        optimizer,
        num_warmup_steps=params.warmup_steps,
        num_training_steps=steps,
    )


@contextlib.contextmanager
def _gradient_checkpointing(model: Any, enable: bool) -> Iterator[None]:
    """Activation checkpointing on `model` inside the block when `enable`, off after it."""
    if not enable:
        yield
        return
    _set_gradient_checkpointing(model, True)
    try:
        yield
    finally:
        _set_gradient_checkpointing(model, False)


def _set_gradient_checkpointing(model: Any, enable: bool) -> None:
    """Activation checkpointing on every decoder layer (transformers' own), non-reentrant:
    the variant that needs no gradient on the inputs, so a LoRA model with frozen
    embeddings works, and that gives the same gradients as without it. transformers 5
    renamed gradient_checkpointing_* to activation_checkpointing_*; both are handled."""
    renamed = hasattr(model, "activation_checkpointing_enable")
    if enable:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise SpecError(
                f"hyperparameters.gradient_checkpointing: {type(model).__name__} does "
                "not support gradient checkpointing; set it to false",
                param="hyperparameters.gradient_checkpointing",
            )
        kwargs = {"use_reentrant": False}
        if renamed:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    (model.activation_checkpointing_disable if renamed else model.gradient_checkpointing_disable)()
    # enabling may also have hooked the embeddings' output to require grad; unhook it
    with contextlib.suppress(AttributeError):
        model.disable_input_require_grads()
