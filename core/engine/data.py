"""Forget / retain / eval sets: tokenization into training examples, and collation.

The formats and their validation live in core.engine.formats (torch-free, used by the API);
they are re-exported here for the engine's callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.engine.formats import (  # noqa: F401 - re-exported
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RECORD_CHARS,
    Kind,
    Problem,
    Records,
    ValidationReport,
    load_records,
    validate_file,
)
from core.engine.losses import IGNORE_INDEX
from core.errors import DataError

# --- tokenization -------------------------------------------------------------


@dataclass
class Example:
    """One training sequence: token ids and labels (IGNORE_INDEX where not a target).

    labels are *unshifted*: labels[t] == input_ids[t] where token t is a target; `collate`
    shifts them so that logits[t] is scored against labels[t + 1].
    """

    input_ids: list[int]
    labels: list[int]


def _chat_prompt_ids(tokenizer: Any, context: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat record's context, ending where the assistant's answer starts.
    With the tokenizer's chat template the rendered text is tokenized without special
    tokens, as transformers does: templates write their own BOS (Llama 2/3, Mistral), and
    adding one more would give the model a double BOS it never saw in training. Without a
    template, plain "role: content" lines, with the tokenizer's usual special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return encode_prompt(tokenizer, text, add_special_tokens=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in context) + "assistant: "
    return encode_prompt(tokenizer, text)


def prompt_ids_and_target(
    tokenizer: Any, record: dict[str, Any], kind: Kind
) -> tuple[list[int], str]:
    """(prompt token ids, target text) of a qa or chat record; for chat the last assistant
    turn is the target and the turns before it the prompt."""
    if kind == "qa":
        return encode_prompt(tokenizer, record["prompt"]), record["response"]
    if kind == "chat":
        return _chat_prompt_ids(tokenizer, record["messages"][:-1]), record["messages"][-1][
            "content"
        ]
    raise ValueError(f"{kind} records have no prompt/target split")


def encode_prompt(tokenizer: Any, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])


def line_list(lines: list[int], count: int) -> str:
    """File lines for people: "3, 5, 9", and ", ..." when `count` records are more than
    the lines shown."""
    return ", ".join(map(str, lines)) + (", ..." if count > len(lines) else "")


# What a record that max_length leaves without a target is not, by its set's role.
LEFT_OUT = {"forget": "unlearned", "retain": "trained on", "contrast": "trained on"}


@dataclass
class Encoded:
    """A set tokenized for training, with what max_length did to it: which records (by
    file line) lost part of their target, and which lost all of it and are not trained
    on. A compliance report must say so: those records are not unlearned."""

    examples: list[Example]
    records: int
    target_tokens: int
    max_length: int
    truncated_lines: list[int] = field(default_factory=list)
    skipped_lines: list[int] = field(default_factory=list)
    example_lines: list[int] = field(default_factory=list)  # the file line of each example

    def summary(self) -> dict[str, Any]:
        """The counts for metrics.json, with at most 20 line numbers each."""
        return {
            "records": self.records,
            "examples": len(self.examples),
            "target_tokens": self.target_tokens,
            "max_length": self.max_length,
            "truncated": {"count": len(self.truncated_lines), "lines": self.truncated_lines[:20]},
            "skipped": {"count": len(self.skipped_lines), "lines": self.skipped_lines[:20]},
        }

    def warning(self, role: str) -> str | None:
        """One sentence on what max_length cut from the `role` set ("forget", "retain"),
        or None when it cut nothing."""
        parts = []
        for lines, what in (
            (
                self.skipped_lines,
                f"no target token within max_length and will not be {LEFT_OUT[role]}",
            ),
            (self.truncated_lines, "a target cut at max_length"),
        ):
            if lines:
                parts.append(
                    f"{len(lines)} of {self.records} records have {what} "
                    f"(lines {line_list(lines[:10], len(lines))})"
                )
        if not parts:
            return None
        return (
            f"{role} set: "
            + "; ".join(parts)
            + f"; raise hyperparameters.max_length ({self.max_length}) to keep them"
        )


def encode_records(
    records: Records, tokenizer: Any, max_length: int, *, eos_target: bool = True
) -> Encoded:
    """Tokenize records into examples of at most max_length tokens.

    qa/chat: prompt tokens are masked; the response is the target, followed by an EOS
    that is a target too unless `eos_target` is False (the forget side's default: see
    TrainingParams.forget_eos); over-long pairs are cut from the right, and a record
    whose prompt fills max_length keeps no target and gives no example. text: each
    document is tokenized once and cut into consecutive windows of max_length tokens
    (paper: 2048 for books, 512 for WMDP); nothing is cut off.
    """
    examples: list[Example] = []
    example_lines: list[int] = []
    truncated: list[int] = []
    skipped: list[int] = []
    eos = tokenizer.eos_token_id
    if records.kind in ("qa", "chat"):
        for index, record in enumerate(records.items):
            prompt_ids, target = prompt_ids_and_target(tokenizer, record, records.kind)
            target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
            target_labels = list(target_ids)
            if eos is not None:
                target_ids.append(eos)
                target_labels.append(eos if eos_target else IGNORE_INDEX)
            all_labels = [IGNORE_INDEX] * len(prompt_ids) + target_labels
            labels = all_labels[:max_length]
            if not any(label != IGNORE_INDEX for label in labels[1:]):
                skipped.append(records.line_of(index))
                continue
            if any(label != IGNORE_INDEX for label in all_labels[max_length:]):
                truncated.append(records.line_of(index))
            examples.append(Example((prompt_ids + target_ids)[:max_length], labels))
            example_lines.append(records.line_of(index))
    elif records.kind == "text":
        for index, record in enumerate(records.items):
            ids = list(tokenizer(record["text"], add_special_tokens=True)["input_ids"])
            for start in range(0, len(ids), max_length):
                window = ids[start : start + max_length]
                if len(window) >= 2:
                    examples.append(Example(window, list(window)))
                    example_lines.append(records.line_of(index))
    else:
        raise DataError(f"{records.kind} files are for evaluation, not for unlearning")
    if not examples:
        if skipped:
            raise DataError(
                f"no record has a target token within max_length={max_length}: "
                f"the prompts fill it; raise hyperparameters.max_length"
            )
        raise DataError("no usable examples: every record was empty after tokenization")
    target_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
    return Encoded(
        examples, len(records.items), target_tokens, max_length, truncated, skipped, example_lines
    )


def build_examples(
    records: Records, tokenizer: Any, max_length: int, *, eos_target: bool = True
) -> list[Example]:
    """`encode_records(...).examples`: the examples alone."""
    return encode_records(records, tokenizer, max_length, eos_target=eos_target).examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns input_ids, attention_mask and labels, each [B, T].
    The labels are already shifted to line up with the model's logits: labels[b, t] is
    the target of logits[b, t] (token t + 1), and the last column is IGNORE_INDEX.
    Shifting the labels rather than slicing the logits (logits[:, :-1]) spares a copy of
    the logits, and its gradient, in every loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention[row, :n] = 1
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": shifted}
