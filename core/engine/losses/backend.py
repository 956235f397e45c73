"""How the losses run: the backend switch, and the conventions every implementation shares.

Three backends compute the same numbers (`logprobs`, `triton_kernels`):
- "eager": chunked torch ops, no start-up cost; the CPU's.
- "compiled": the same maths written as two pure functions for torch.compile, which
  fuses the row gather, the target exclusion and the reduction into one pass and the
  backward into another; it costs a one-off compilation.
- "triton": hand-written Triton kernels, one pass over the logits each way, no host
  sync; CATNIP's whole loss is three kernels; CUDA only.
"auto" (the default) is triton for CUDA logits where Triton is installed at a version
the kernels have run on (TRITON_VERIFIED or newer), eager otherwise. `set_backend`
picks one per process (the worker reads LOSS_BACKEND).

On the CPU the eager losses run their row loops on `cpu_threads()` intra-op threads
(`set_cpu_threads`; default 1), not the process's: they are many short parallel regions,
and with another process busy on the machine each region waits for the thread that
was descheduled (docs/performance.md has the figures).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
from collections.abc import Iterator
from typing import Literal, get_args

import torch

IGNORE_INDEX = -100  # a label that does not count (prompt, padding)
Backend = Literal["auto", "eager", "compiled", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_backend: Backend = "auto"

# The oldest Triton the kernels have run on (pytest -m gpu on an H100, torch 2.11). The
# auto backend uses them from this version on and stays eager below it (an older image's
# Triton may not compile them, and every job would fail); LOSS_BACKEND=triton forces them.
TRITON_VERIFIED = (3, 6)


# Intra-op threads of the eager losses' row loops on the CPU; None: the process's.
_cpu_threads: int | None = 1


def get_backend() -> Backend:
    return _backend


def set_cpu_threads(threads: int | None) -> None:
    """Intra-op threads the eager losses use on the CPU (None: the process's own)."""
    global _cpu_threads
    if threads is not None and threads < 1:
        raise ValueError(f"cpu threads must be at least 1 (or None), not {threads}")
    _cpu_threads = threads


def get_cpu_threads() -> int | None:
    return _cpu_threads


@contextlib.contextmanager
def cpu_threads(device: torch.device) -> Iterator[None]:
    """Run the block on the eager losses' CPU thread count (see the module docstring);
    other devices, and a process with no more threads than that, are left alone."""
    threads = _cpu_threads
    before = torch.get_num_threads()
    if device.type != "cpu" or threads is None or before <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_verified() -> bool:
    """Triton is installed and at least TRITON_VERIFIED."""
    if not triton_installed():
        return False
    import triton

    return version_tuple(triton.__version__) >= TRITON_VERIFIED


def version_tuple(version: str) -> tuple[int, ...]:
    """'3.6.0+git1234' -> (3, 6, 0), '3.7.0rc1' -> (3, 7, 0): the leading digits of each
    part, up to the first part that does not start with one."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def set_backend(name: Backend) -> None:
    """Choose how the losses run in this process: auto, eager, compiled or triton.
    ValueError names the valid ones, or says that Triton is not installed."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown loss backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "triton" and not triton_installed():
        raise ValueError(
            "the triton loss backend needs the triton package (it comes with "
            "CUDA builds of torch); use auto, eager or compiled"
        )
    _backend = name


def check_device(device: torch.device) -> None:
    """ValueError if this process's backend cannot run on `device` (triton off CUDA)."""
    if _backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton loss backend runs on CUDA tensors, not {device.type}")


def use_triton(logits: torch.Tensor) -> bool:
    """Whether the losses run on the Triton kernels for these logits."""
    if logits.dtype == torch.float64:  # the kernels accumulate in float32
        return False
    if _backend == "auto":
        return logits.device.type == "cuda" and triton_verified()
    check_device(logits.device)
    return _backend == "triton"


def check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")


def flat_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] as [R, V] with a contiguous last dimension (a view where it can)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()
