"""The distillation set must hold no forget data: a student distilled on forget records
learns them back from a teacher that still knows a trace of them. Torch-free: the API
refuses an overlapping submission with it, the engine checks again before loading.

A distill record overlaps a forget record when their texts (lower-cased words; a QA
record's prompt and response, a chat record's turns, a text record's text) share a run
of RUN_WORDS words, or when a forget record shorter than that appears whole in it. A
forget answer alone ("Paris") does not make a neighbour's record overlap.
"""

from __future__ import annotations

import re
from typing import Any

from core.engine.formats import Records
from core.errors import DataError

RUN_WORDS = 8
LINES_NAMED = 10
_WORD = re.compile(r"\w+")


def record_words(record: dict[str, Any], kind: str) -> tuple[str, ...]:
    """The lower-cased words of one record of `kind` (qa, chat or text)."""
    if kind == "qa":
        text = f"{record['prompt']} {record['response']}"
    elif kind == "chat":
        text = " ".join(str(m.get("content", "")) for m in record["messages"])
    else:
        text = str(record.get("text", ""))
    return tuple(_WORD.findall(text.lower()))


def _runs(words: tuple[str, ...], length: int) -> set[tuple[str, ...]]:
    return {words[i : i + length] for i in range(len(words) - length + 1)}


def overlapping_lines(forget: Records, distill: Records) -> list[tuple[int, int]]:
    """(distill line, forget line) for every distill record that overlaps a forget record
    (the first forget record it meets), in file order."""
    runs: dict[tuple[str, ...], int] = {}  # a forget run of RUN_WORDS words -> its line
    short: dict[int, dict[tuple[str, ...], int]] = {}  # whole short records, by length
    for index, record in enumerate(forget.items):
        words = record_words(record, forget.kind)
        line = forget.line_of(index)
        if len(words) >= RUN_WORDS:
            for run in _runs(words, RUN_WORDS):
                runs.setdefault(run, line)
        elif words:
            short.setdefault(len(words), {}).setdefault(words, line)
    found = []
    for index, record in enumerate(distill.items):
        words = record_words(record, distill.kind)
        hit = next((runs[r] for r in _runs(words, RUN_WORDS) if r in runs), None)
        for length, whole in short.items():
            if hit is not None:
                break
            hit = next((whole[r] for r in _runs(words, length) if r in whole), None)
        if hit is not None:
            found.append((distill.line_of(index), hit))
    return found


def check_distill_set(forget: Records, distill: Records) -> None:
    """DataError (param distill_file) naming the distill lines that repeat forget data."""
    found = overlapping_lines(forget, distill)
    if not found:
        return
    named = ", ".join(f"line {d} (forget_file line {f})" for d, f in found[:LINES_NAMED])
    more = f" and {len(found) - LINES_NAMED} more" if len(found) > LINES_NAMED else ""
    raise DataError(
        f"distill_file: {len(found)} records repeat forget data: {named}{more}; a "
        f"distillation set holds retain and general text only (a shared run of {RUN_WORDS} "
        "words, or a whole shorter forget record, counts): remove those lines",
        param="distill_file",
    )
