"""A warm cache of base models for a worker that runs job after job: the weights of the
last models loaded stay in host memory, and a later job on the same model takes them
from there instead of reading and parsing the files again.

What a job gets depends on what it will do with the weights:
- `shared=True` (a LoRA job: peft freezes the base, and every merge in the engine is
  into a copy): a module tree of its own whose tensors are the cached ones. Nothing is
  copied, so the hit costs next to nothing. The cache checks that promise at every hit
  with a fingerprint of each tensor (a sample of its values): a dense write
  through a shared tensor (a merged adapter, an optimizer step) changes it, and the
  entry is dropped and loaded again from the files instead of reaching the next job.
- otherwise (full-weight training, a previous job's adapter merged into the base in
  place): a copy of its own.
The cached models live on the CPU, whatever the device (the device's memory is the
job's; a job on another device gets its copy there); the cache is bounded by bytes,
least recently used out. A model whose files change (re-registered at the same path) is
loaded again."""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
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


def _tensors(model: Any) -> list[torch.Tensor]:
    """Every parameter and buffer, each once (tied weights are one)."""
    seen: dict[int, torch.Tensor] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def fingerprint(model: Any, blocks: int = 16, block: int = 64) -> list[float]:
    """Per tensor, the sum (float64) of `blocks` runs of `block` values spread evenly over
    it (the whole tensor when it is smaller): it changes when the tensor is written
    densely, and reads a few pages of each (a memory-mapped weight is not read whole)."""
    prints = []
    with torch.no_grad():
        for tensor in _tensors(model):
            flat = tensor.detach().reshape(-1)
            if flat.numel() > blocks * block:
                starts = torch.linspace(0, flat.numel() - block, blocks).long()
                flat = flat[(starts[:, None] + torch.arange(block)).reshape(-1)]
            prints.append(float(flat.double().sum()))
    return prints


def sharing_copy(model: Any) -> Any:
    """A copy of the module tree whose parameters and buffers are new tensor objects on
    the same storage: the tree (LoRA wrapping replaces modules) and each tensor's
    attributes (requires_grad) are the copy's own, the values are not."""
    memo: dict[int, Any] = {}
    for tensor in _tensors(model):
        if isinstance(tensor, torch.nn.Parameter):
            memo[id(tensor)] = torch.nn.Parameter(tensor.detach(), tensor.requires_grad)
        else:
            memo[id(tensor)] = tensor.detach()
    return copy.deepcopy(model, memo)


@dataclass
class _Entry:
    model: Any
    tokenizer: Any
    size: int
    prints: list[float]


class ModelCache:
    """`load(path, device)` as modeling.load_base, from memory where it can. `max_bytes`
    0 turns it off. `last` says what the last load did: hit, miss or off, and seconds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self.last: dict[str, Any] = {}

    def load(
        self, path: str | Path, device: torch.device, *, shared: bool = False
    ) -> tuple[Any, Any]:
        """(model, tokenizer) on `device`. `shared`: the caller will not write the
        weights (see the module's docstring), so on the CPU it may share the cached ones."""
        started = time.monotonic()
        path = Path(path).resolve()
        dtype = default_dtype(device)
        if self.max_bytes <= 0:
            model, tokenizer = load_base(path, device, dtype)
            self.last = {"cache": "off", "seconds": round(time.monotonic() - started, 3)}
            return model, tokenizer
        key = (str(path), str(dtype), _signature(path) if path.is_dir() else None)
        entry = self.entries.get(key)
        if entry is not None and fingerprint(entry.model) != entry.prints:
            log.warning("model %s: the cached weights were written to; loading it again", path)
            del self.entries[key]
            entry = None
        if entry is None:
            cpu_model, tokenizer = load_base(path, torch.device("cpu"), dtype)
            cpu_model.eval()
            entry = _Entry(cpu_model, tokenizer, model_bytes(cpu_model), fingerprint(cpu_model))
            self._drop_stale(key)
            if entry.size <= self.max_bytes:
                self._make_room(entry.size)
                self.entries[key] = entry
            outcome = "miss"
        else:
            self.entries.move_to_end(key)
            outcome = "hit"
        kept = key in self.entries
        if not kept:
            model = entry.model  # not kept: the job's own
        elif shared or device.type != "cpu":  # on another device, .to() makes the copy
            model = sharing_copy(entry.model)
        else:
            model = copy.deepcopy(entry.model)
        model.to(device)
        self.last = {
            "cache": outcome,
            "shared": kept and shared and device.type == "cpu",  # the job's are the cache's
            "seconds": round(time.monotonic() - started, 3),
        }
        log.info("model %s: %s (%.2f s)", path.name, outcome, self.last["seconds"])
        return model, copy.deepcopy(entry.tokenizer)

    def _drop_stale(self, key: tuple[Any, ...]) -> None:
        for other in [k for k in self.entries if k[:2] == key[:2] and k != key]:
            del self.entries[other]  # the same path, other files: re-registered

    def _make_room(self, size: int) -> None:
        held = sum(e.size for e in self.entries.values())
        while self.entries and held + size > self.max_bytes:
            held -= self.entries.popitem(last=False)[1].size
