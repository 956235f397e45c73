"""FLAT's contrast set: the response the model is expected to give to each forget prompt.

From the job's contrast_file, which gives line by line the expected response to each
forget record (same kind, same prompts), or, without one, from built-in refusals, one
drawn per record with the run's seed. Contrast example i is forget example i's pair:
both streams draw batches with one seed, so each forget batch meets its own expected
responses. A text forget set has no prompts to answer: its contrast_file (any training
kind) is drawn as a stream of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from core.engine.data import Encoded, Example, encode_records, line_list
from core.engine.formats import Records, check_pairing
from core.errors import DataError

# Expected answers to a question the model should no longer answer: plain statements
# of not knowing, none naming a topic, so they fit any forget set.
REFUSALS = (
    "I don't know the answer to that.",
    "I'm not able to answer that question.",
    "I have no information about that.",
    "That is not something I can tell you.",
    "I'm sorry, but I don't have an answer for that.",
    "I can't help with that question.",
    "I don't have any knowledge of that.",
    "I am unable to provide that information.",
    "I'm not sure; I have no reliable information on that.",
    "That's outside what I can answer.",
    "I cannot recall anything about that.",
    "I'd rather not guess: I don't know.",
)
BUILT_IN = "built-in refusals"


@dataclass
class ContrastSet:
    examples: list[Example]
    encoded: Encoded
    paired: bool  # example i is the expected response to forget example i
    source: str  # "contrast_file" or BUILT_IN
    unknown_lines: list[int] = field(default_factory=list)  # responses with the unknown token

    def warning(self) -> str | None:
        """What the report says about the contrast set, or None: what max_length cut,
        and the lines of a contrast_file the tokenizer cannot write."""
        parts = [self.encoded.warning("contrast")]
        if self.unknown_lines:
            lines = line_list(self.unknown_lines[:10], len(self.unknown_lines))
            parts.append(
                f"contrast_file: {len(self.unknown_lines)} responses hold the tokenizer's "
                f"unknown token (lines {lines}): FLAT raises its probability there"
            )
        return "; ".join(p for p in parts if p) or None

    def summary(self) -> dict[str, Any]:
        return {**self.encoded.summary(), "source": self.source, "paired": self.paired}


def _prompt(record: dict[str, Any], kind: str) -> Any:
    return record["prompt"] if kind == "qa" else record["messages"][:-1]


def _answered(record: dict[str, Any], kind: str, response: str) -> dict[str, Any]:
    if kind == "qa":
        return {"prompt": record["prompt"], "response": response}
    return {"messages": [*record["messages"][:-1], {"role": "assistant", "content": response}]}


def contrast_records(forget: Records, contrast: Records | None, seed: int) -> Records:
    """The contrast records, checked against the forget set: paired line by line for a
    qa/chat forget set (refusals where `contrast` is None), as given for a text one."""
    check_pairing(
        forget.kind,
        len(forget.items),
        contrast.kind if contrast is not None else None,
        len(contrast.items) if contrast is not None else None,
    )
    if forget.kind == "text" and contrast is not None:  # (without one: refused above)
        return contrast
    if contrast is None:
        rng = random.Random(seed)
        items = [_answered(r, forget.kind, rng.choice(REFUSALS)) for r in forget.items]
        return Records(forget.kind, items, [forget.line_of(i) for i in range(len(items))])
    for index, (mine, theirs) in enumerate(zip(forget.items, contrast.items, strict=True)):
        if _prompt(mine, forget.kind) != _prompt(theirs, forget.kind):
            raise DataError(
                f"contrast_file line {contrast.line_of(index)}: its prompt differs from the "
                f"forget set's line {forget.line_of(index)}; the contrast file answers the "
                "forget prompts in their order",
                param="contrast_file",
            )
    return contrast


def build_contrast(
    forget: Records,
    forget_encoded: Encoded,
    contrast: Records | None,
    tokenizer: Any,
    max_length: int,
    seed: int,
) -> ContrastSet:
    """The contrast examples, aligned with the forget examples where paired."""
    records = contrast_records(forget, contrast, seed)
    encoded = encode_records(records, tokenizer, max_length)
    source = "contrast_file" if contrast is not None else BUILT_IN
    unknown = _unknown_lines(encoded, tokenizer)
    if unknown and contrast is None:
        raise DataError(
            "the built-in refusals are not in this tokenizer's vocabulary: they tokenize to "
            f"its unknown token {tokenizer.unk_token!r} (the refusals to forget lines "
            f"{line_list(unknown[:10], len(unknown))}), and FLAT would teach the model to say "
            "that; give a contrast_file of expected responses the tokenizer can write",
            param="contrast_file",
        )
    if forget.kind == "text":
        return ContrastSet(encoded.examples, encoded, False, source, unknown)
    # contrast record i answers forget record i: align the examples by record
    forget_line = {records.line_of(i): forget.line_of(i) for i in range(len(records.items))}
    by_forget_line = {
        forget_line[line]: example
        for line, example in zip(encoded.example_lines, encoded.examples, strict=True)
    }
    examples = []
    for line in forget_encoded.example_lines:
        if line not in by_forget_line:
            where = "contrast_file's record for" if contrast is not None else "the refusal to"
            raise DataError(
                f"{where} forget line {line} keeps no response token within max_length="
                f"{max_length}; raise hyperparameters.max_length",
                param="hyperparameters.max_length",
            )
        examples.append(by_forget_line[line])
    return ContrastSet(examples, encoded, True, source, unknown)


def _unknown_lines(encoded: Encoded, tokenizer: Any) -> list[int]:
    """The lines whose response holds the tokenizer's unknown token (a closed vocabulary
    that cannot write it; byte-level tokenizers have none)."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    return sorted(
        {
            line
            for line, example in zip(encoded.example_lines, encoded.examples, strict=True)
            if unk in example.labels
        }
    )
