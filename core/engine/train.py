"""The unlearning loop: setup, steps, save. Reads top to bottom.

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

from core.engine import losses
from core.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from core.engine.data import Example, collate
from core.engine.events import Events, StepInfo
from core.engine.methods import ForgetTerms, Method, TrainingParams, prepare
from core.engine.modeling import Wrapped
from core.engine.steps import StepInputs
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
    keep_stop_rule = stop_rule.save if stop_rule is not None else None
    model = wrapped.model
    device = next(model.parameters()).device
    if (params.retain_loss != "none" or method.needs_retain) and not retain:
        raise ValueError(f"{method.id} with retain_loss {params.retain_loss} needs retain examples")
    if method.uses_contrast and not contrast:
        raise ValueError(f"{method.id} needs contrast examples")
    if contrast_paired and contrast is not None and len(contrast) != len(forget):
        raise ValueError("paired contrast examples must be as many as the forget examples")
    if shard is not None and stop_rule is not None:
        raise ValueError("the stop rule does not run in a sharded loop")

    # --- setup
    seed_everything(params.seed)
    state = prepare(wrapped, method, params)  # what trains may change here (RMU)
    steps = total_steps(params, len(forget))
    named = wrapped.trainable()
    # sharded, the shards are the masters already (core.engine.sharded.shard_model)
    masters = _master_weights(named) if params.master_weights and shard is None else {}
    optimized = {name: masters.get(name, p) for name, p in named.items()}  # what AdamW updates
    trainable = list(optimized.values())
    optimizer = torch.optim.AdamW(
        trainable, lr=params.learning_rate, weight_decay=params.weight_decay
    )
    scheduler = _make_scheduler(optimizer, params, steps)
    forget_stream = BatchStream(forget, params.batch_size, params.seed, pad_id)
    retain_stream = (
        BatchStream(retain, params.batch_size, params.seed + 1, pad_id) if retain else None
    )
    contrast_seed = params.seed if contrast_paired else params.seed + 2
    contrast_stream = (
        BatchStream(contrast, params.batch_size, contrast_seed, pad_id) if contrast else None
    )
    # Without an explicit cadence, a run with a checkpoint directory saves about every
    # 10% of its steps, so a killed worker loses at most a tenth of the work.
    checkpoint_every = params.checkpoint_every or max(1, steps // 10)
    start_step, stop_reason = 0, None
    if checkpoint_dir is not None and fingerprint is None:
        fingerprint = run_fingerprint(method, params, wrapped, forget, retain, contrast)
    resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        if shard is not None:
            start_step, stop_reason = shard.load(
                resume_from, model, optimizer, scheduler, fingerprint
            )
        else:
            start_step, stop_reason = load_checkpoint(
                resume_from, optimized, optimizer, scheduler, fingerprint
            )
        _copy_masters_into(named, masters)
        log.info("resumed from %s at step %d of %d", resume_from, start_step, steps)
        if stop_rule is not None:
            stop_rule.load(resume_from)
        events.resumed(start_step)
    result = LoopResult(
        steps_done=start_step,
        total_steps=steps,
        stopped_early=stop_reason is not None,
        stop_reason=stop_reason,
    )
    # checkpointing is switched off again however the loop ends (a cancel raises)
    with _gradient_checkpointing(model, params.gradient_checkpointing):
        model.train()
        accum = params.gradient_accumulation_steps
        started = time.monotonic()
        tokens_seen = 0

        def forget_part(index: int) -> tuple[torch.Tensor, dict[str, float]]:
            """The method's loss on micro-batch `index` (a step loss's retain term too)."""
            batch = _on(device, forget_stream.batch(index))
            if method.step_loss is None:
                loss = _forget_loss(wrapped, method, params, _forward_logits(model, batch), batch)
                return loss, {"forget": float(loss.detach())}
            inputs = StepInputs(
                wrapped,
                batch,
                retain=_on(device, retain_stream.batch(index)) if retain_stream else None,
                contrast=_on(device, contrast_stream.batch(index)) if contrast_stream else None,
                state=state,
            )
            return method.step_loss(inputs, params)  # its own terms

        def retain_part(index: int) -> tuple[torch.Tensor, dict[str, float]] | None:
            if retain_stream is None or params.retain_loss == "none":
                return None
            term = _retain_term(wrapped, params, retain_stream.batch(index), device)
            return term, {f"retain_{params.retain_loss}": float(term.detach())}

        def save(step: int, stop_reason: str | None = None) -> Path:
            assert checkpoint_dir is not None
            if shard is not None:
                return shard.save(
                    checkpoint_dir,
                    step,
                    model,
                    optimizer,
                    scheduler,
                    fingerprint=fingerprint,
                    stop_reason=stop_reason,
                )
            return save_checkpoint(
                checkpoint_dir,
                step,
                optimized,
                optimizer,
                scheduler,
                stop_reason=stop_reason,
                fingerprint=fingerprint,
                extra=keep_stop_rule,
            )

        # --- steps
        for step in range(start_step + 1, (start_step if stop_reason else steps) + 1):
            if events.should_cancel():
                raise JobCancelled(f"cancelled at step {step - 1} of {steps}")
            terms_sum: dict[str, float] = {}
            loss_sum = 0.0

            indices = [(step - 1) * accum + micro for micro in range(accum)]
            for index in indices:  # every rank's, for the run's throughput
                tokens_seen += int(forget_stream.batch(index)["attention_mask"].sum())
            if shard is not None:
                indices = shard.mine(indices)
            sharp = params.sam_rho > 0
            for index in indices:  # the gradient at the weights (SAM: of the forget loss alone)
                loss, micro_terms = forget_part(index)
                retained = None if sharp else retain_part(index)
                if retained is not None:
                    loss = loss + params.retain_weight * retained[0]
                    micro_terms.update(retained[1])
                (loss / accum).backward()
                loss_sum += float(loss.detach()) / accum
                for name, value in micro_terms.items():
                    terms_sum[name] = terms_sum.get(name, 0.0) + value / accum
            if sharp:
                with _sam_perturbed(named, params.sam_rho):  # the forget loss's gradient there
                    for index in indices:
                        (forget_part(index)[0] / accum).backward()
                for index in indices:  # and the retain term's at the weights themselves
                    retained = retain_part(index)
                    if retained is None:
                        continue
                    (params.retain_weight * retained[0] / accum).backward()
                    loss_sum += params.retain_weight * float(retained[0].detach()) / accum
                    for name, value in retained[1].items():
                        terms_sum[name] = terms_sum.get(name, 0.0) + value / accum
            if shard is not None:
                loss_sum, terms_sum = shard.total(loss_sum, terms_sum)
            for name, master in masters.items():  # the low-precision gradients, to the masters
                grad, named[name].grad = named[name].grad, None
                master.grad = None if grad is None else grad.float()
            if params.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            _copy_masters_into(named, masters)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.monotonic() - started
            done_here = step - start_step
            info = StepInfo(
                step=step,
                total_steps=steps,
                loss=loss_sum,
                terms=terms_sum,
                learning_rate=learning_rate,
                tokens_per_second=tokens_seen / elapsed if elapsed > 0 else 0.0,
                eta_seconds=elapsed / done_here * (steps - step),
            )
            result.history.append(info)
            result.steps_done = step
            events.step(info)
            reason = stop_rule.check(step) if stop_rule is not None else None
            if reason is not None:
                result.stopped_early, result.stop_reason = True, reason
                break
            if checkpoint_dir is not None and step % checkpoint_every == 0 and step < steps:
                events.checkpoint(save(step))

        # --- save
        if checkpoint_dir is not None and result.steps_done > start_step:
            events.checkpoint(save(result.steps_done, result.stop_reason))
    model.eval()
    return result


# --- batches, schedules, losses ------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def total_steps(params: TrainingParams, n_examples: int) -> int:
    """max_steps when given, else ceil(epochs * batches per epoch / accumulation)."""
    if params.max_steps is not None:
        return params.max_steps
    batches_per_epoch = math.ceil(n_examples / params.batch_size)
    return max(1, math.ceil(params.epochs * batches_per_epoch / params.gradient_accumulation_steps))


class BatchStream:
    """Micro-batch i of a run, deterministically, from (seed, epoch) permutations."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._epoch = -1
        self._order: list[int] = []

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            self._epoch = epoch
        ids = self._order[position * self.batch_size : (position + 1) * self.batch_size]
        return collate([self.examples[i] for i in ids], self.pad_id)


def _on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V], aligned with batch['labels'] [B, T] (collate shifts the labels)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _make_scheduler(optimizer: torch.optim.Optimizer, params: TrainingParams, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        name[params.lr_scheduler],
        optimizer,
        num_warmup_steps=params.warmup_steps,
        num_training_steps=steps,
    )


# --- sharpness-aware unlearning ------------------------------------------------


@contextlib.contextmanager
def _sam_perturbed(named: dict[str, torch.nn.Parameter], rho: float) -> Iterator[None]:
    """Sharpness-aware minimisation of the forget loss (Foret et al., 2021; for
    unlearning, Fan et al., 2025, "Towards LLM Unlearning Resilient to Relearning
    Attacks"): min_theta max_{||delta|| <= rho} l_f(theta + delta) + lambda l_r(theta).

    On entry the trainable parameters hold the forget loss's gradient g at theta; they are
    moved to theta + delta, delta = rho * g / ||g|| (the first-order worst case within the
    ball), and their gradients cleared, so the backward inside the block leaves the
    gradient at theta + delta. On exit the weights are theta again (restored from copies,
    exact in any dtype). The update then descends a loss that stays low in a whole
    neighbourhood of theta: a short fine-tune (a relearning attack) has farther to go."""
    grads = {name: p.grad for name, p in named.items() if p.grad is not None}
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()])
    )
    scale = rho / (norm + 1e-12)
    saved = {}
    with torch.no_grad():
        for name, grad in grads.items():
            param = named[name]
            saved[name] = param.detach().clone()
            param.add_((grad.float() * scale).to(param.dtype))
            param.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)


# --- fp32 master weights -------------------------------------------------------

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _master_weights(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """fp32 copies of the trainable parameters held in bf16/fp16, for the optimizer to
    update in their place. Adam's steps are about the learning rate in size; at 1e-5 on
    weights of ~0.02 they are below bf16's resolution (2^-8 relative) and round away
    (benchmarks/bench_precision.py measures it; docs/performance.md). The model keeps its
    dtype for every forward; after each step the masters are rounded into it."""
    return {
        name: p.detach().float().requires_grad_(True)
        for name, p in named.items()
        if p.dtype in LOW_PRECISION
    }


@torch.no_grad()
def _copy_masters_into(
    named: dict[str, torch.nn.Parameter], masters: dict[str, torch.Tensor]
) -> None:
    for name, master in masters.items():
        named[name].copy_(master)


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


def _forget_loss(
    wrapped: Wrapped,
    method: Method,
    params: TrainingParams,
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The method's forget loss on one batch: from the logits in one call where the method
    has that form, else from the token log-probs (and the reference's, where it uses one)."""
    if method.loss_from_logits is not None:
        return method.loss_from_logits(logits, batch["labels"], params)
    logp, log1m = losses.token_logprobs(logits, batch["labels"])  # [B, T] each
    ref_logp = None
    if method.uses_reference:
        with wrapped.reference_mode() as reference:
            ref_logits = _forward_logits(reference, batch)
            ref_logp, _ = losses.token_logprobs(ref_logits, batch["labels"])
            del ref_logits
    assert method.forget_loss is not None  # Method holds one of the two
    return method.forget_loss(ForgetTerms(logp, log1m, batch["labels"], ref_logp), params)


def _retain_term(
    wrapped: Wrapped, params: TrainingParams, batch: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """NLL on retain data, or KL to the reference model on retain data (eq. 1)."""
    batch = _on(device, batch)
    logits = _forward_logits(wrapped.model, batch)
    if params.retain_loss == "nll":
        logp, _ = losses.token_logprobs(logits, batch["labels"])
        return losses.nll_from_logprobs(logp, batch["labels"] != losses.IGNORE_INDEX)
    with wrapped.reference_mode() as reference:
        ref_logits = _forward_logits(reference, batch)
    return losses.kl_retain_loss(logits, ref_logits, batch["labels"])
