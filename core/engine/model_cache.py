"""A warm cache of base models for a worker that runs job after job: the weights of the
last models loaded stay in host memory, and a later job on the same model gets its own
copy of them instead of reading and parsing the files again.

What a job gets is always a fresh copy: LoRA wrapping, merged start adapters and
full-weight training change the model in place, and none of that may reach the cached
one or the next job. The cached models live on the CPU, whatever the device (the
device's memory is the job's); the cache is bounded by bytes, least recently used out.
A model whose files change (re-registered at the same path) is loaded again."""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from core.engine.modeling import default_dtype, load_base

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What identifies the directory's content cheaply: each file's name, size, mtime."""
    stats = ((p, p.stat()) for p in sorted(path.rglob("*")) if p.is_file())
    return tuple((str(p.relative_to(path)), s.st_size, s.st_mtime_ns) for p, s in stats)


def model_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class ModelCache:
    """`load(path, device)` as modeling.load_base, from memory where it can. `max_bytes`
    0 turns it off. `last` says what the last load did: hit, miss or off, and seconds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[Any, ...], tuple[Any, Any, int]] = OrderedDict()
        self.last: dict[str, Any] = {}

    def load(self, path: str | Path, device: torch.device) -> tuple[Any, Any]:
        started = time.monotonic()
        path = Path(path).resolve()
        dtype = default_dtype(device)
        if self.max_bytes <= 0:
            model, tokenizer = load_base(path, device, dtype)
            self.last = {"cache": "off", "seconds": round(time.monotonic() - started, 3)}
            return model, tokenizer
        key = (str(path), str(dtype), _signature(path) if path.is_dir() else None)
        entry = self.entries.get(key)
        if entry is None:
            cpu_model, tokenizer = load_base(path, torch.device("cpu"), dtype)
            cpu_model.eval()
            size = model_bytes(cpu_model)
            self._drop_stale(key)
            if size <= self.max_bytes:
                self._make_room(size)
                self.entries[key] = (cpu_model, tokenizer, size)
            outcome = "miss"
        else:
            self.entries.move_to_end(key)
            cpu_model, tokenizer, _ = entry
            outcome = "hit"
        # the job's own copy, on its device: nothing it does reaches the cached one
        model = copy.deepcopy(cpu_model) if key in self.entries else cpu_model
        model.to(device)
        self.last = {"cache": outcome, "seconds": round(time.monotonic() - started, 3)}
        log.info("model %s: %s (%.2f s)", path.name, outcome, self.last["seconds"])
        return model, copy.deepcopy(tokenizer)

    def _drop_stale(self, key: tuple[Any, ...]) -> None:
        for other in [k for k in self.entries if k[:2] == key[:2] and k != key]:
            del self.entries[other]  # the same path, other files: re-registered

    def _make_room(self, size: int) -> None:
        held = sum(e[2] for e in self.entries.values())
        while self.entries and held + size > self.max_bytes:
            held -= self.entries.popitem(last=False)[1][2]
