"""Attacks on the unlearned model: does the knowledge come back?

- Relearning: fine-tune every weight (the attacker holds them: a copy of the model with
  any LoRA adapter merged) on an attack split of the forget questions or texts, for each
  cell of a sweep (learning rate x steps x data), then measure forget KnowMem on the
  other questions. recovery = (after_attack - after) / (before - after): 0 when nothing
  came back, 1 when all of it did.
- Quantization: weight-only round-to-nearest, 8 and 4 bits, group-wise, in plain torch
  (and NF4 through bitsandbytes where CUDA and the package are present), on a copy of
  the model with any LoRA adapter merged, as a deployment would serve it.
- In-context extraction: the measured forget questions asked with k forget-set QA pairs
  of the attack split as demonstrations before them (paper Fig. 2 uses such context).
Every attack leaves the model as it found it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.engine.data import Records, collate, encode_records

log = logging.getLogger(__name__)


@dataclass
class AttackSplit:
    """Indices into the measured forget questions: the attack uses one part, every
    measurement the other, so nothing the attack trains on is scored."""

    attack: list[int]
    measured: list[int]


def split_for_attack(count: int, fraction: float, seed: int) -> AttackSplit:
    """A seeded split of `count` questions: round(fraction x count) (at least 1) attack
    the model, the rest (at least 1) are measured."""
    indices = list(range(count))
    random.Random(seed).shuffle(indices)
    n_attack = min(count - 1, max(1, round(fraction * count)))
    return AttackSplit(sorted(indices[:n_attack]), sorted(indices[n_attack:]))


def recovery(before: float, after: float, attacked: float) -> float | None:
    """(attacked - after) / (before - after); None when unlearning removed nothing to
    recover (before - after below 1% of before)."""
    removed = before - after
    if removed <= 0.01 * max(abs(before), 1e-12):
        return None
    return (attacked - after) / removed


# --- quantization -------------------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest weight-only quantization, dequantized back to the weight's dtype.

    weight [out, in] is cut along `in` into groups of `group_size` (the last group may be
    shorter); each group gets its own asymmetric min-max grid of 2^bits levels:
        scale = (max - min) / (2^bits - 1),  zero = round(-min / scale),
        q = clamp(round(w / scale) + zero, 0, 2^bits - 1),  w' = (q - zero) * scale.
    A group whose values are all equal is returned as it is."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn takes a matrix, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    levels = 2**bits - 1
    result = torch.empty_like(weight)
    w = weight.float()
    for start in range(0, in_features, group_size):
        group = w[:, start : start + group_size]
        low = group.amin(dim=1, keepdim=True)
        high = group.amax(dim=1, keepdim=True)
        scale = (high - low) / levels
        flat = scale == 0
        scale = torch.where(flat, torch.ones_like(scale), scale)
        zero = torch.round(-low / scale)
        q = torch.clamp(torch.round(group / scale) + zero, 0, levels)
        deq = (q - zero) * scale
        result[:, start : start + group_size] = torch.where(flat, group, deq).to(weight.dtype)
    return result


def _nf4(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(weight.contiguous(), quant_type="nf4")
    return bnb_functional.dequantize_4bit(packed, state).to(weight.dtype)


def nf4_available(model: Any) -> str | None:
    """None when NF4 can run here, else why not."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if next(model.parameters()).device.type != "cuda":
        return "NF4 (bitsandbytes) needs the model on a CUDA device"
    return None


def merged_copy(model: Any) -> Any:
    """A copy of the model as it would be served: a LoRA adapter merged into its base."""
    duplicate = copy.deepcopy(model)
    if hasattr(duplicate, "merge_and_unload"):
        duplicate = duplicate.merge_and_unload()
    return duplicate.eval()


def quantized_copy(model: Any, scheme: str, group_size: int) -> Any:
    """A merged copy whose linear layers (all but the output head, as RTN and NF4
    deployments keep it) hold quantized weights: scheme 'int8', 'int4' or 'nf4'."""
    duplicate = merged_copy(model)
    head = (
        duplicate.get_output_embeddings() if hasattr(duplicate, "get_output_embeddings") else None
    )
    with torch.no_grad():
        for module in duplicate.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                if scheme == "nf4":
                    module.weight.copy_(_nf4(module.weight))
                else:
                    bits = {"int8": 8, "int4": 4}[scheme]
                    module.weight.copy_(quantize_rtn(module.weight, bits, group_size))
    return duplicate


# --- relearning ---------------------------------------------------------------------


def finetune(
    model: Any,
    tokenizer: Any,
    records: Records,
    *,
    steps: int | list[int],
    learning_rate: float,
    batch_size: int,
    max_length: int,
    seed: int,
    at_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Fine-tune `model`'s trainable weights on `records` (NLL of their responses, or of
    the texts' windows) with AdamW at a constant rate, in place, for max(steps) steps;
    `at_step(k)` runs (in eval mode) after step k for each k in `steps`. Batches are drawn
    with `seed`, so a shorter budget is the longer one's prefix. Returns the step losses."""
    budgets = sorted({steps} if isinstance(steps, int) else set(steps))
    examples = encode_records(records, tokenizer, max_length).examples
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = random.Random(seed)
    losses = []
    for step in range(1, budgets[-1] + 1):
        model.train()
        batch = collate(
            generator.sample(examples, min(batch_size, len(examples))), tokenizer.pad_token_id
        )
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch["labels"].to(device).reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if at_step is not None and step in budgets:
            model.eval()
            at_step(step)
    model.eval()
    return losses


def attacker_copy(model: Any) -> Any:
    """What the relearning attack fine-tunes: a copy of the model as it would be served
    (a LoRA adapter merged), every weight trainable. It costs one more copy of the weights
    on the model's device, and while it trains their gradients and AdamW's two moments."""
    duplicate = merged_copy(model)
    for parameter in duplicate.parameters():
        parameter.requires_grad_(True)
    return duplicate


def relearn(
    wrapped: Any,
    tokenizer: Any,
    records: Records,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    max_length: int,
    seed: int,
) -> list[float]:
    """Fine-tune the job's trainable weights (wrapped.model) on `records` for `steps`
    AdamW steps, in place (`finetune`); returns the step losses."""
    return finetune(
        wrapped.model,
        tokenizer,
        records,
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
    )


def with_weights_restored(wrapped: Any, action: Callable[[], Any]) -> Any:
    """Run `action` (which may train the model) and put every trainable weight back."""
    saved = {name: p.detach().to("cpu", copy=True) for name, p in wrapped.trainable().items()}
    try:
        return action()
    finally:
        trainable = wrapped.trainable()
        with torch.no_grad():
            for name, tensor in saved.items():
                trainable[name].copy_(tensor)
        wrapped.model.eval()


def in_context_prompts(
    questions: list[dict[str, Any]], demonstrations: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each question's prompt preceded by the demonstrations, as `prompt response` lines."""
    context = "".join(f"{d['prompt']} {d['response']}\n" for d in demonstrations)
    return [{**q, "prompt": context + q["prompt"]} for q in questions]


def nan_to_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
