"""Metadata: a small map of strings a tenant attaches to a job or a file (a ticket id, a
request reference), returned everywhere and filterable in lists
(`?metadata[ticket]=T-1`). Checked here, with an error naming the key at fault."""

from __future__ import annotations

import json
import re
from typing import Any

from core.errors import SpecError

MAX_KEYS = 50
MAX_KEY_CHARS = 40
MAX_VALUE_CHARS = 500
_KEY = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_KEY_CHARS}}}")
_FILTER = re.compile(r"metadata\[(?P<key>[^\]]*)\]")


def parse_metadata(raw: Any, param: str = "metadata") -> dict[str, str]:
    """The metadata of a request (None: none); SpecError naming the key and the rule."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(
            f'{param} must be an object of strings, like {{"ticket": "T-1"}}', param=param
        )
    if len(raw) > MAX_KEYS:
        raise SpecError(f"{param} has {len(raw)} keys; at most {MAX_KEYS}", param=param)
    for key, value in raw.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise SpecError(
                f"{param}: key {key!r} must be 1-{MAX_KEY_CHARS} letters, digits or _ . : -",
                param=param,
            )
        if not isinstance(value, str):
            raise SpecError(
                f"{param}.{key} must be a string, not {type(value).__name__}",
                param=f"{param}.{key}",
            )
        if len(value) > MAX_VALUE_CHARS:
            raise SpecError(
                f"{param}.{key} has {len(value)} characters; at most {MAX_VALUE_CHARS}",
                param=f"{param}.{key}",
            )
        if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):
            raise SpecError(f"{param}.{key} is not valid text", param=f"{param}.{key}")
    return dict(raw)


def parse_metadata_json(text: str | None, param: str = "metadata") -> dict[str, str]:
    """Metadata sent as a JSON object in a form field (uploads)."""
    if text is None or text == "":
        return {}
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise SpecError(f"{param} is not JSON: {exc}", param=param) from None
    return parse_metadata(raw, param)


def metadata_filters(query: list[tuple[str, str]]) -> dict[str, str]:
    """`metadata[key]=value` pairs of a query string (every one must hold)."""
    filters: dict[str, str] = {}
    for name, value in query:
        match = _FILTER.fullmatch(name)
        if match is None:
            continue
        key = match.group("key")
        if not _KEY.fullmatch(key):
            raise SpecError(
                f"{name}: the key must be 1-{MAX_KEY_CHARS} letters, digits or _ . : -",
                param=name,
            )
        filters[key] = value
    return filters
