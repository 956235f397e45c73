"""Checkpoints of the unlearning loop: save, load, and the fingerprint a resume must match.

A checkpoint (step-N/) stores the trainable weights (fp32 masters where the model holds
bf16), the AdamW and scheduler state and the RNG state, plus whatever the stop rule adds,
and is written atomically: a directory without state.json is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.engine.data import Example
from core.engine.modeling import Wrapped
from core.engine.spec.methods import Method, TrainingParams
from core.errors import SpecError

CHECKPOINTS_KEPT = 2


def _checkpoint_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path | None) -> Path | None:
    if root is None or not root.is_dir():
        return None
    done = [d for d in _checkpoint_dirs(root) if (d / "state.json").is_file()]
    return done[-1] if done else None


def run_fingerprint(
    method: Method,
    params: TrainingParams,
    wrapped: Wrapped,
    forget: list[Example],
    retain: list[Example] | None,
    contrast: list[Example] | None = None,
    start: str | None = None,
) -> str:
    """What a checkpoint must match to be resumed, as a sha256 hex digest: the method,
    every hyperparameter but the two that leave the maths alone (checkpoint_every,
    gradient_checkpointing), the trainable tensors' names and shapes, the digest of the
    previous job's output a sequential job starts from, and the token ids and labels of
    the forget, retain and contrast examples."""
    digest = hashlib.sha256()
    settings = params.model_dump(
        mode="json", exclude={"checkpoint_every", "gradient_checkpointing"}
    )
    trainable = [(name, list(p.shape)) for name, p in wrapped.trainable().items()]
    named: dict = {"method": method.id, "params": settings, "trainable": trainable}
    if start is not None:  # absent otherwise: the fingerprints of other jobs stay as they were
        named["start"] = start
    digest.update(json.dumps(named, sort_keys=True).encode())
    for examples in (forget, retain or [], *([contrast] if contrast is not None else [])):
        digest.update(b"|")
        for e in examples:
            digest.update(array("q", e.input_ids).tobytes() + b"/" + array("q", e.labels).tobytes())
    return digest.hexdigest()


def save_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stop_reason: str | None = None,
    fingerprint: str | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write step-N/: trainable.safetensors, optimizer.pt, state.json.
    `stop_reason` marks the last checkpoint of a run the stop rule ended, so a resume
    after that point does not train on past it; `fingerprint` (run_fingerprint) is what
    a resume must match. `weights` are what the optimizer updates (fp32 masters where
    the model holds bf16). `extra(directory)` may add files before the checkpoint is
    sealed."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {n: p.detach().to("cpu").contiguous() for n, p in weights.items()},
        tmp / "trainable.safetensors",
    )
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        tmp / "optimizer.pt",
    )
    if extra is not None:
        extra(tmp)
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "stop_reason": stop_reason, "fingerprint": fingerprint})
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoint_dirs(root)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checked_state(path: Path, fingerprint: str | None, *, sharded: bool) -> dict[str, Any]:
    """A checkpoint's state.json; SpecError when it records a fingerprint other than
    `fingerprint` (checkpoints of before fingerprints record none, and are taken), or
    when it is a sharded run's and `sharded` is not (core.engine.sharded), or the reverse."""
    meta = json.loads((path / "state.json").read_text())
    written_by = meta.get("sharded")
    if bool(written_by) != sharded:
        what = f"a run sharded over {written_by} devices" if written_by else "a one-device run"
        raise SpecError(
            f"the checkpoint {path} is {what}'s: resume it with resources.gpus "
            f"{written_by or 1} (any number above 1 for a sharded one), or start afresh in "
            f"another output directory (or remove {path.parent})",
            param="resources.gpus",
            code="checkpoint_mismatch",
        )
    if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
        raise SpecError(
            f"the checkpoint {path} is from another run: the method, hyperparameters, "
            f"adapter or data differ from this one's. Resume with the spec and files "
            f"it was made with, or start afresh in another output directory (or remove "
            f"{path.parent})",
            code="checkpoint_mismatch",
        )
    return meta


def ensure_resumable(root: Path | None, fingerprint: str, *, sharded: bool = False) -> None:
    """SpecError now, rather than when the loop starts, if `root`'s latest checkpoint is
    another run's (the pipeline checks before its evaluation, which can take long)."""
    latest = latest_checkpoint(root)
    if latest is not None:
        _checked_state(latest, fingerprint, sharded=sharded)


def load_checkpoint(
    path: Path,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: str | None = None,
) -> tuple[int, str | None]:
    """Restore a checkpoint written by save_checkpoint; returns its step and stop reason.
    SpecError, before anything is restored, when it is another run's (`fingerprint`)."""
    meta = _checked_state(path, fingerprint, sharded=False)
    for name, tensor in load_file(path / "trainable.safetensors").items():
        weights[name].data.copy_(tensor)
    state = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(meta["step"]), meta.get("stop_reason")
