"""Training the demo's models: a small Llama on the demo corpus until it answers the
watched questions, with a progress report whose throughput is real (tokens per second)
and whose ETA aims at where training is expected to stop (the accuracy trend), not at
the epoch bound."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from core.engine.events import Events, StepInfo


class Size(Protocol):
    """What training reads of a demo size (core.demo.build.SIZES)."""

    @property
    def hidden(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
    @property
    def max_epochs(self) -> int: ...


log = logging.getLogger(__name__)

TARGET_ACCURACY = 0.99
CHECK_EVERY = 10  # epochs between accuracy checks
LEARNING_RATE = 3e-3
BATCH_SIZE = 64


def answer_accuracy(
    model: Any, tokenizer: Any, records: list[dict[str, str]], batch_size: int = 256
) -> float:
    """Share of QA records whose every response token is the model's greedy choice
    (teacher-forced argmax equals greedy decoding when all tokens match)."""
    from core.engine.data import Records, build_examples, collate

    examples = build_examples(Records("qa", records), tokenizer, max_length=64)
    device = next(model.parameters()).device
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            labels = batch["labels"].to(device)
            hit = (logits.argmax(-1) == labels) | (labels == -100)
            correct += int(hit.all(dim=1).sum())
    return correct / len(examples)


def epochs_to_target(history: list[tuple[int, float]], max_epochs: int) -> int | None:
    """The epoch at which the lowest watched accuracy is expected to reach the target,
    extrapolating the last two checks linearly (capped at max_epochs); None before two
    checks or while it does not rise."""
    if len(history) < 2:
        return None
    (e0, a0), (e1, a1) = history[-2], history[-1]
    if a1 >= TARGET_ACCURACY:
        return e1
    rate = (a1 - a0) / (e1 - e0)
    if rate <= 0:
        return None
    return min(max_epochs, e1 + math.ceil((TARGET_ACCURACY - a1) / rate))


def expected_stop(history: list[tuple[int, float]], epoch: int, max_epochs: int) -> int | None:
    """The check (every CHECK_EVERY epochs) at which training is expected to stop, seen
    from `epoch`: the trend's epoch rounded up to a check, and never one already past."""
    target = epochs_to_target(history, max_epochs)
    if target is None:
        return None
    stop = max(target, epoch + 1)
    return min(max_epochs, math.ceil(stop / CHECK_EVERY) * CHECK_EVERY)


def _new_model(tokenizer: Any, spec: Size, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _epoch(
    model: Any, optimizer: Any, examples: list[Any], order: list[int], pad_id: int
) -> tuple[float, int]:
    """One pass over `examples` in `order`: the last batch's loss and the tokens seen."""
    from core.engine.data import collate

    model.train()
    loss, tokens = torch.zeros(()), 0
    for start in range(0, len(order), BATCH_SIZE):
        batch = collate([examples[i] for i in order[start : start + BATCH_SIZE]], pad_id)
        tokens += int(batch["attention_mask"].sum())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), tokens


def train_model(
    directory: Path,
    name: str,
    tokenizer: Any,
    texts: list[str],
    watched: dict[str, list[dict[str, str]]],
    spec: Size,
    seed: int,
    events: Events,
) -> dict[str, Any]:
    """Train a small Llama on `texts` until it answers 99% of every `watched` QA set (at
    most max_epochs), and save it with the tokenizer under directory/name. Each epoch is
    a step to `events` (its tokens per second; an ETA to the expected stopping epoch
    once two accuracy checks show a trend, else none); each check is a probe."""
    from core.engine.data import Example

    model = _new_model(tokenizer, spec, seed)
    examples = []
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(ids, list(ids)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    accuracy = dict.fromkeys(watched, 0.0)
    history: list[tuple[int, float]] = []
    sizes = " + ".join(str(len(records)) for records in watched.values())
    events.phase(
        f"building the demo {name}",
        f"until it answers 99% of {sizes} questions (checked every {CHECK_EVERY} epochs), "
        f"at most {spec.max_epochs} epochs",
    )
    started, epoch = time.monotonic(), 0
    for epoch in range(1, spec.max_epochs + 1):
        epoch_started = time.monotonic()
        order = torch.randperm(len(examples), generator=generator).tolist()
        loss, tokens = _epoch(model, optimizer, examples, order, tokenizer.pad_token_id)
        now = time.monotonic()
        expected = expected_stop(history, epoch, spec.max_epochs)
        per_epoch = (now - started) / epoch
        events.step(
            StepInfo(
                step=epoch,
                total_steps=spec.max_epochs,
                loss=loss,
                terms={},
                learning_rate=LEARNING_RATE,
                tokens_per_second=tokens / max(now - epoch_started, 1e-9),
                eta_seconds=None if expected is None else per_epoch * (expected - epoch),
            )
        )
        if epoch % CHECK_EVERY == 0:
            accuracy = {d: answer_accuracy(model, tokenizer, r) for d, r in watched.items()}
            events.probe(epoch, accuracy)
            history.append((epoch, min(accuracy.values())))
            log.info("%s: epoch %d loss %.4f accuracy %s", name, epoch, loss, accuracy)
            if min(accuracy.values()) >= TARGET_ACCURACY:
                break
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory / name)
    tokenizer.save_pretrained(directory / name)
    return {
        "epochs": epoch,
        "accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds_per_epoch": round((time.monotonic() - started) / max(epoch, 1), 2),
    }
