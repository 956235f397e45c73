"""Forget / retain / eval file formats and their validation, with line numbers.

Formats (one per file, detected from the first record):
  qa    JSONL {"prompt": str, "response": str}      the response is the target
  chat  JSONL {"messages": [{"role", "content"}...]} the last assistant turn is the target
  text  .txt, or JSONL {"text": str}                 cut into max_length windows, all targets
  mc    JSONL {"question": str, "choices": [str...], "answer": int}  (eval only)

`validate_file` reads a whole file and reports every problem with its line number and
field, so the API can show a person exactly what to fix. `load_records` returns the
records of a valid file or raises `DataError` with that report. No torch here: the
API validates uploads with this module alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from core.errors import DataError

Kind = Literal["qa", "chat", "text", "mc"]

MAX_PROBLEMS_LISTED = 50
DEFAULT_MAX_RECORD_CHARS = 1_000_000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


class Problem(BaseModel):
    line: int | None  # 1-based; None for file-level problems
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class ValidationReport(BaseModel):
    valid: bool
    kind: Kind | None
    records: int
    problems: list[Problem]
    problems_total: int

    def summary(self, filename: str) -> str:
        if self.valid:
            return f"{filename}: {self.records} {self.kind} records"
        shown = "; ".join(str(p) for p in self.problems[:5])
        more = self.problems_total - min(5, len(self.problems))
        tail = f" (and {more} more)" if more > 0 else ""
        return f"{filename} is invalid: {shown}{tail}"


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _detect_kind(obj: dict[str, Any]) -> Kind | None:
    for candidate, key in (
        ("qa", "prompt"),
        ("qa", "response"),
        ("chat", "messages"),
        ("mc", "choices"),
        ("text", "text"),
    ):
        if key in obj:
            return candidate  # type: ignore[return-value]
    return None


def _check_record(obj: Any, kind: Kind | None) -> tuple[Kind | None, list[tuple[str | None, str]]]:
    """(kind of this record, [(field, problem)]) for one parsed JSON line."""
    if not isinstance(obj, dict):
        return None, [(None, f"expected a JSON object, got {type(obj).__name__}")]
    detected = _detect_kind(obj)
    if kind is None:
        if detected is None:
            keys = ", ".join(sorted(obj)) or "none"
            return None, [
                (
                    None,
                    "cannot tell the format: expected 'prompt'+'response', "
                    f"'messages', 'text' or 'question'+'choices'+'answer' (keys: {keys})",
                )
            ]
        kind = detected
    elif detected is not None and detected != kind:
        return detected, []
    problems: list[tuple[str | None, str]] = []
    required = {
        "qa": ("prompt", "response"),
        "chat": ("messages",),
        "text": ("text",),
        "mc": ("question", "choices", "answer"),
    }[kind]
    for name in required:
        if name not in obj:
            problems.append((name, f"missing (a {kind} file needs {', '.join(required)})"))
    if problems:
        return kind, problems
    if kind in ("qa", "text", "mc"):
        for name in ("prompt", "response", "text", "question"):
            if name in required:
                value = obj[name]
                if not _is_text(value):
                    problems.append((name, f"must be a string, got {type(value).__name__}"))
                elif not value.strip():
                    problems.append((name, "is empty"))
    if kind in ("qa", "mc") and "fact" in obj and not (_is_text(obj["fact"]) and obj["fact"]):
        problems.append(("fact", "must be a non-empty string (records about one fact share it)"))
    if kind == "chat":
        problems += _check_messages(obj["messages"])
    if kind == "mc":
        choices, answer = obj["choices"], obj["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(map(_is_text, choices)):
            problems.append(("choices", "must be a list of at least 2 strings"))
        elif (
            not isinstance(answer, int)
            or isinstance(answer, bool)
            or not 0 <= answer < len(choices)
        ):
            problems.append(
                ("answer", f"must be an integer index into choices (0..{len(choices) - 1})")
            )
    return kind, problems


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether a parsed record holds a lone UTF-16 surrogate (JSON allows "\\ud800"; it is
    no character, and tokenizers cannot encode it)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_messages(messages: Any) -> list[tuple[str | None, str]]:
    if not isinstance(messages, list) or not messages:
        return [("messages", "must be a non-empty list of {role, content}")]
    for i, msg in enumerate(messages):
        if (
            not isinstance(msg, dict)
            or not _is_text(msg.get("role"))
            or not _is_text(msg.get("content"))
        ):
            return [(f"messages[{i}]", "must be an object with string 'role' and 'content'")]
    if messages[-1]["role"] != "assistant":
        return [("messages", "the last message must have role 'assistant' (it is the target)")]
    if not messages[-1]["content"].strip():
        return [(f"messages[{len(messages) - 1}].content", "is empty")]
    return []


def validate_file(
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
    allowed_kinds: tuple[Kind, ...] | None = None,
) -> ValidationReport:
    """Read a file line by line and report every problem with its line number and field."""
    path = Path(path)
    problems: list[Problem] = []
    total = 0

    def add(line: int | None, fld: str | None, message: str) -> None:
        nonlocal total
        total += 1
        if len(problems) < MAX_PROBLEMS_LISTED:
            problems.append(Problem(line=line, field=fld, message=message))

    size = path.stat().st_size
    if size == 0:
        add(None, None, "the file is empty")
        return ValidationReport(
            valid=False, kind=None, records=0, problems=problems, problems_total=total
        )
    if size > max_bytes:
        add(None, None, f"the file is {size} bytes; the limit is {max_bytes}")
        return ValidationReport(
            valid=False, kind=None, records=0, problems=problems, problems_total=total
        )

    with path.open("rb") as fh:
        head = fh.read(8192)
    if b"\x00" in head:
        # Text has no NUL bytes; a file with them early on is binary (an image, a zip, a
        # model file), and its "lines" would only produce noise.
        nul_line = head[: head.index(b"\x00")].count(b"\n") + 1
        add(
            nul_line,
            None,
            "contains NUL bytes: this looks like a binary file, not UTF-8 text "
            "(upload JSONL or .txt)",
        )
        return ValidationReport(
            valid=False, kind=None, records=0, problems=problems, problems_total=total
        )

    raw_text_file = path.suffix.lower() == ".txt"
    kind: Kind | None = "text" if raw_text_file else None
    records = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if b"\x00" in raw:
                add(lineno, None, "contains NUL bytes: this looks like a binary file, not text")
                break
            try:
                line = raw.decode(
                    "utf-8-sig" if lineno == 1 else "utf-8"
                )  # a leading BOM is no text
            except UnicodeDecodeError as exc:
                add(
                    lineno,
                    None,
                    f"is not valid UTF-8 (byte {exc.start + 1}: {raw[exc.start : exc.start + 1]!r})",
                )
                continue
            if raw_text_file:
                if line.strip():
                    records = 1
                continue
            if not line.strip():
                continue  # blank lines between JSONL records are tolerated
            if len(line) > max_record_chars:
                add(
                    lineno,
                    None,
                    f"record is {len(line)} characters; the limit is {max_record_chars}",
                )
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                add(lineno, None, f"is not valid JSON: {exc.msg} at column {exc.colno}")
                continue
            except RecursionError:
                add(lineno, None, "is not readable JSON: it is nested too deeply")
                continue
            if "\\ud" in line.lower() and _has_lone_surrogate(obj):
                add(
                    lineno,
                    None,
                    "contains a \\uD800-\\uDFFF escape that is not half of a pair: "
                    "that is no character, and cannot be tokenized",
                )
                continue
            record_kind, record_problems = _check_record(obj, kind)
            if kind is None and record_kind is not None:
                kind = record_kind
            elif record_kind is not None and record_kind != kind:
                add(
                    lineno, None, f"is a {record_kind} record but the file's first record is {kind}"
                )
                continue
            for fld, message in record_problems:
                add(lineno, fld, message)
            if not record_problems:
                records += 1
    if raw_text_file and records == 0 and total == 0:
        add(None, None, "the file has no text (only white space)")
    if records == 0 and total == 0:
        add(None, None, "the file has no records")
    if kind is not None and allowed_kinds is not None and kind not in allowed_kinds:
        add(
            None,
            None,
            f"a {kind} file cannot be used here; expected one of: {', '.join(allowed_kinds)}",
        )
    return ValidationReport(
        valid=total == 0, kind=kind, records=records, problems=problems, problems_total=total
    )


@dataclass
class Records:
    """A file's records; `lines[i]` is the file line of `items[i]` (empty when the
    records were not read from a file: they are then numbered from 1)."""

    kind: Kind
    items: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def line_of(self, index: int) -> int:
        return self.lines[index] if self.lines else index + 1


def check_file(path: str | Path, *, allowed_kinds: tuple[Kind, ...] | None = None) -> Kind:
    """The kind of a valid file (read once, nothing kept); DataError naming the file and
    lines otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    report = validate_file(path, allowed_kinds=allowed_kinds)
    if not report.valid:
        raise DataError(report.summary(path.name))
    if report.kind is None:  # a valid report always has a kind; keep the invariant explicit
        raise DataError(f"{path.name}: cannot tell the file's format")
    return report.kind


def load_records(path: str | Path, *, allowed_kinds: tuple[Kind, ...] | None = None) -> Records:
    """The records of a valid file; DataError naming the file and lines otherwise."""
    path = Path(path)
    kind = check_file(path, allowed_kinds=allowed_kinds)
    if kind == "text" and path.suffix.lower() == ".txt":
        return Records("text", [{"text": path.read_text(encoding="utf-8-sig")}], [1])
    items, lines = [], []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                items.append(json.loads(line))
                lines.append(lineno)
    return Records(kind, items, lines)


def check_pairing(
    forget_kind: str, forget_count: int, contrast_kind: str | None, contrast_count: int | None
) -> None:
    """What the kinds and record counts alone show of a contrast set (the API checks it
    at submission from the files' validation, the engine again on the records): a text
    forget set needs a contrast_file; a qa/chat one's answers its prompts line by line,
    in its format. `contrast_kind` None: no contrast_file."""
    if forget_kind == "text":
        if contrast_kind is None:
            raise DataError(
                "method flat on a text forget set needs a contrast_file: the built-in "
                "refusals answer prompts, and text records have none",
                param="contrast_file",
            )
        return
    if contrast_kind is None:
        return
    if contrast_kind != forget_kind:
        raise DataError(
            f"contrast_file holds {contrast_kind} records and the forget set {forget_kind}: "
            "it gives the expected response to each forget prompt, in the same format",
            param="contrast_file",
        )
    if contrast_count != forget_count:
        raise DataError(
            f"contrast_file has {contrast_count} records and the forget set "
            f"{forget_count}: it gives, line by line, the expected response to each "
            "forget prompt",
            param="contrast_file",
        )
