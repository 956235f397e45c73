"""Block sizes and the direct launch of compiled kernels: on a GPU at training sizes each
small op costs more in launch than in arithmetic, so every launch after the first of its
kind bypasses Triton's Python launcher (`_launch`)."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton

from core.engine.losses.backend import TRITON_VERIFIED, version_tuple

# Columns per block and warps per program, from a sweep of blocks 1024-32768 by 4-32
# warps on an H100 (docs/performance.md): the forward kernels only read their row and run
# fastest in blocks of 8192 with 8 warps; the backward, which reads and writes, as one
# 32k block with 32 warps. Larger vocabularies take a few blocks.
FORWARD_BLOCK = 8192
BACKWARD_BLOCK = 32768


@functools.cache
def _forward_config(vocab: int) -> tuple[int, int]:
    block = min(FORWARD_BLOCK, triton.next_power_of_2(vocab))
    return block, (8 if block >= 4096 else 4)


@functools.cache
def _backward_config(vocab: int) -> tuple[int, int]:
    block = min(BACKWARD_BLOCK, triton.next_power_of_2(vocab))
    return block, (32 if block >= 16384 else 16 if block >= 4096 else 8 if block >= 1024 else 4)


@functools.cache
def _label_block(length: int, most: int) -> int:
    return min(most, triton.next_power_of_2(length))


# Launchers of compiled kernels, by everything Triton specialises a launch on, for
# launching them directly. Triton's own launcher (kernel[grid](...)) binds and specialises
# every argument, builds a string key, looks up the stream through torch.cuda and builds
# launch metadata on every call; at the sizes of a training step that is most of the
# loss's time (docs/performance.md).
_LAUNCHERS: dict[tuple, tuple] = {}
# The compiled kernel's run(grid, stream, function, metadata, launch metadata, hooks,
# *args) is how Triton 3.6 to 3.9 launch one (their source was read; 3.6 is the one run);
# other versions, and the interpreter (TRITON_INTERPRET=1), go through kernel[grid].
_DIRECT = (
    TRITON_VERIFIED <= version_tuple(triton.__version__)[:2] <= (3, 9)
    and os.environ.get("TRITON_INTERPRET") != "1"
)


def _specialisation(arg: Any) -> tuple:
    """What Triton compiles a kernel for, of one argument (at least as fine as its rules):
    a tensor's dtype, device and 16-byte alignment; an integer's width, whether it is 1
    and whether it divides by 16; a float is a float."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.get_device(), arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, arg < 2**63
    return (type(arg),)


def _launch_hooks() -> bool:
    """Whether a tool (a profiler such as Triton's proton) watches launches: then every
    launch goes through Triton's launcher, which calls the hooks."""
    hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def _launch(kernel: Any, rows: int, args: tuple, constants: dict, num_warps: int) -> None:
    """kernel[(rows,)](*args, **constants, num_warps=num_warps): through Triton's launcher
    the first time for each specialisation (it compiles or finds the kernel), directly
    after that. `constants` are the kernel's constexpr parameters, its last ones, in order."""
    key = (kernel, num_warps, *constants.values(), *map(_specialisation, args))
    launcher = _LAUNCHERS.get(key)
    if launcher is None or _launch_hooks():
        compiled = kernel[(rows,)](*args, **constants, num_warps=num_warps)
        if _DIRECT:
            _LAUNCHERS[key] = (
                compiled.run,
                compiled.function,
                compiled.packed_metadata,
                tuple(constants.values()),
            )
        return
    run, function, metadata, values = launcher
    stream = torch._C._cuda_getCurrentRawStream(args[0].get_device())
    run(rows, 1, 1, stream, function, metadata, None, None, None, *args, *values)
