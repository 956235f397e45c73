"""One step of the unlearning loop (core.engine.train): the step's micro-batches, their
losses, the gradient (plain, or sharpness-aware), and the optimizer's update.

A step of `gradient_accumulation_steps` micro-batches backpropagates each micro-batch's
loss divided by that count, so the summed .grad is the gradient of the step's mean loss;
a rank of a sharded run backpropagates its share of them with the same divisor and the
ranks' gradients sum to the same mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from core.engine import losses
from core.engine.data import Example, collate
from core.engine.modeling import Wrapped
from core.engine.spec.methods import ForgetTerms, Method, TrainingParams
from core.engine.steps import Batch, StepInputs

# --- micro-batches and their losses --------------------------------------------


class BatchStream:
    """Micro-batch i of a run, deterministically, from (seed, epoch) permutations."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._epoch = -1
        self._order: list[int] = []

    def batch(self, index: int) -> Batch:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            self._epoch = epoch
        ids = self._order[position * self.batch_size : (position + 1) * self.batch_size]
        return collate([self.examples[i] for i in ids], self.pad_id)


@dataclass
class MicroBatches:
    """The losses on micro-batch i of the run. Each stream's batch i is a dict of
    input_ids, attention_mask and labels, each [B, T], moved to `device` here."""

    wrapped: Wrapped
    method: Method
    params: TrainingParams
    state: Any  # what the method's setup returned (core.engine.spec.methods.prepare)
    device: torch.device
    forget: BatchStream
    retain: BatchStream | None
    contrast: BatchStream | None
    attack: BatchStream | None = None  # the attack in the loop's split of the forget set

    def forget_tokens(self, indices: list[int]) -> int:
        """The real (unpadded) tokens in these forget micro-batches."""
        return sum(int(self.forget.batch(index)["attention_mask"].sum()) for index in indices)

    def forget_loss(self, index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's loss on micro-batch `index` (a step loss's retain term too), a
        scalar, and its named terms."""
        batch = _on(self.device, self.forget.batch(index))
        if self.method.step_loss is None:
            logits = _forward_logits(self.wrapped.model, batch)
            loss = _forget_loss(self.wrapped, self.method, self.params, logits, batch)
            return loss, {"forget": float(loss.detach())}
        inputs = StepInputs(
            self.wrapped,
            batch,
            retain=_on(self.device, self.retain.batch(index)) if self.retain else None,
            contrast=_on(self.device, self.contrast.batch(index)) if self.contrast else None,
            state=self.state,
        )
        return self.method.step_loss(inputs, self.params)  # its own terms

    def retain_loss(self, index: int) -> tuple[torch.Tensor, dict[str, float]] | None:
        """The retain term (unweighted, a scalar) on micro-batch `index`, None without one."""
        if self.retain is None or self.params.retain_loss == "none":
            return None
        term = _retain_term(self.wrapped, self.params, self.retain.batch(index), self.device)
        return term, {f"retain_{self.params.retain_loss}": float(term.detach())}

    def retain_batch(self, index: int) -> Batch:
        """Retain micro-batch `index` on the device (selective updates read it)."""
        if self.retain is None:
            raise ValueError("selective updates need retain examples")
        return _on(self.device, self.retain.batch(index))

    def retain_nll(self, index: int) -> torch.Tensor:
        """NLL of the model on retain micro-batch `index`, a scalar."""
        return _nll(self.wrapped.model, self.retain_batch(index))

    def attack_loss(self, index: int) -> torch.Tensor:
        """The simulated attacker's loss: NLL on its micro-batch `index` of the forget split."""
        if self.attack is None:
            raise ValueError("the attack in the loop has no forget split")
        return _nll(self.wrapped.model, _on(self.device, self.attack.batch(index)))


def _on(device: torch.device, batch: Batch) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _forward_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Logits [B, T, V], aligned with batch['labels'] [B, T] (collate shifts the labels)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _nll(model: Any, batch: Batch) -> torch.Tensor:
    logp, _ = losses.token_logprobs(_forward_logits(model, batch), batch["labels"])
    return losses.nll_from_logprobs(logp, batch["labels"] != losses.IGNORE_INDEX)


def _forget_loss(
    wrapped: Wrapped, method: Method, params: TrainingParams, logits: torch.Tensor, batch: Batch
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
    wrapped: Wrapped, params: TrainingParams, batch: Batch, device: torch.device
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


# --- the step's gradient -------------------------------------------------------


@dataclass
class StepMean:
    """The step's loss and named terms, as means over its `accumulation` micro-batches."""

    accumulation: int
    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, terms: dict[str, float]) -> None:
        self.loss += loss / self.accumulation
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value / self.accumulation


def step_gradients(
    batches: MicroBatches,
    indices: list[int],
    named: dict[str, torch.nn.Parameter],
    params: TrainingParams,
) -> tuple[float, dict[str, float]]:
    """Backpropagate the step's micro-batches `indices` into the .grad of `named` (the
    model's trainable parameters); returns the step's mean loss and terms. (With the
    robust options, core.engine.robust.gradients builds the step's gradient instead.)"""
    mean = StepMean(params.gradient_accumulation_steps)
    if params.sam_rho > 0:
        _sam_gradients(batches, indices, named, params, mean)
    else:
        _plain_gradients(batches, indices, params, mean)
    return mean.loss, mean.terms


def _plain_gradients(
    batches: MicroBatches, indices: list[int], params: TrainingParams, mean: StepMean
) -> None:
    """The gradient of forget + retain_weight * retain at the weights."""
    for index in indices:
        loss, terms = batches.forget_loss(index)
        retained = batches.retain_loss(index)
        if retained is not None:
            loss = loss + params.retain_weight * retained[0]
            terms.update(retained[1])
        (loss / mean.accumulation).backward()
        mean.add(float(loss.detach()), terms)


def _sam_gradients(
    batches: MicroBatches,
    indices: list[int],
    named: dict[str, torch.nn.Parameter],
    params: TrainingParams,
    mean: StepMean,
) -> None:
    """The forget loss's gradient at the worst-case neighbour of the weights, plus
    retain_weight times the retain term's at the weights themselves (_sam_perturbed)."""
    for index in indices:  # g, the forget loss's gradient at the weights, sets delta
        loss, terms = batches.forget_loss(index)
        (loss / mean.accumulation).backward()
        mean.add(float(loss.detach()), terms)
    with _sam_perturbed(named, params.sam_rho):  # the forget loss's gradient there
        for index in indices:
            (batches.forget_loss(index)[0] / mean.accumulation).backward()
    for index in indices:  # and the retain term's at the weights themselves
        retained = batches.retain_loss(index)
        if retained is None:
            continue
        term, terms = retained
        (params.retain_weight * term / mean.accumulation).backward()
        mean.add(params.retain_weight * float(term.detach()), terms)


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


# --- the update, with fp32 master weights --------------------------------------

LOW_PRECISION = (torch.bfloat16, torch.float16)


class TrainedWeights:
    """The model's trainable parameters (`named`) and what AdamW updates in their place
    (`optimized`): with `masters`, fp32 copies of those held in bf16/fp16. Adam's steps
    are about the learning rate in size; at 1e-5 on weights of ~0.02 they are below
    bf16's resolution (2^-8 relative) and round away (benchmarks/bench_precision.py
    measures it; docs/performance.md). The model keeps its dtype for every forward;
    after each step the masters are rounded into it."""

    def __init__(self, named: dict[str, torch.nn.Parameter], *, masters: bool) -> None:
        self.named = named
        self.masters: dict[str, torch.Tensor] = {}
        if masters:
            self.masters = {
                name: p.detach().float().requires_grad_(True)
                for name, p in named.items()
                if p.dtype in LOW_PRECISION
            }
        self.optimized = {name: self.masters.get(name, p) for name, p in named.items()}
        self.trainable = list(self.optimized.values())  # in `named`'s order

    def gradients_to_masters(self) -> None:
        """Move the low-precision gradients, as fp32, onto the masters."""
        for name, master in self.masters.items():
            grad, self.named[name].grad = self.named[name].grad, None
            master.grad = None if grad is None else grad.float()

    @torch.no_grad()
    def masters_into_model(self) -> None:
        for name, master in self.masters.items():
            self.named[name].copy_(master)


@dataclass
class TrainState:
    """What a step changes and a checkpoint restores: the model, its trainable weights
    (with their masters), AdamW's state and the schedule's."""

    model: Any
    weights: TrainedWeights
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler


def apply_update(trained: TrainState, max_grad_norm: float | None) -> float:
    """The optimizer's step on the accumulated gradient, then the schedule's; returns the
    learning rate the step used."""
    trained.weights.gradients_to_masters()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trained.weights.trainable, max_grad_norm)
    # get_last_lr is typed float | Tensor; it is a float, as AdamW's lr is
    learning_rate = float(trained.scheduler.get_last_lr()[0])
    trained.optimizer.step()
    trained.weights.masters_into_model()
    trained.scheduler.step()
    trained.optimizer.zero_grad(set_to_none=True)
    return learning_rate
