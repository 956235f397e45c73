"""Triton kernels for token_logprobs, CATNIP and the retain KL on a GPU (the "triton" backend).

The same maths as the eager backend (`logprobs`), one program per row of logits [R, V]:
    forward:  logit_y, lse_o = logsumexp over every token but the target (online, in
              blocks of the row), lse = logaddexp(logit_y, lse_o);
              logp = logit_y - lse, log1m = lse_o - lse (exact at any margin)
    backward: grad[row] = g * (onehot(y) - exp(x - lse)), written in the logits' dtype
A row whose label is the ignore index gets logp = log1m = 0 and a zero gradient row
without its logits being read, so prompt and padding cost a write, not a pass.
CATNIP itself has two forward kernels of its own: one program per row for softplus(u)
and its derivative in log z (eq. 8, 9), then one program for the per-sample mean with
the token stride, which writes the loss and each row's weighted derivative. The whole
loss is then three kernels (the backward is the one above); on a GPU at training sizes
each small op costs more in launch than in arithmetic, so every launch after the first
of its kind bypasses Triton's Python launcher (`_launch`).

Why: on a GPU the eager backend is launch-bound at training sizes (about 40 kernels and
three host syncs per forward and backward), and torch.compile's regions cost as much
again in call overhead. The measured figures are in docs/performance.md.

Imported only when that backend runs: Triton is a CUDA-side dependency (it ships with
CUDA builds of torch, not with the CPU wheel). With TRITON_INTERPRET=1 the kernels run
on CPU tensors through Triton's interpreter, which is how they are checked without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

from core.engine.losses.backend import IGNORE_INDEX, TRITON_VERIFIED, version_tuple

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


@triton.jit
def _online_lse_step(m, s, x):
    """One block x of an online log-sum-exp: the running max m and sum s of exp(values - m)
    taken up to x's values too."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # only -inf so far: no NaN
    return m_new, s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)


@triton.jit
def _row_stats(base, label, vocab, BLOCK: tl.constexpr):
    """(logit_y, lse_others, lse) of one row of logits at `base`, in float32."""
    # a target outside the vocabulary reads nothing and gives NaN (the loss's finite check names it)
    logit_y = tl.load(base + label, mask=label < vocab, other=float("nan")).to(tl.float32)
    m = float("-inf")  # running max and sum of exp(x - m) over the non-target tokens
    s = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m, s = _online_lse_step(m, s, tl.where(cols == label, float("-inf"), x))
    lse_others = tl.where(s > 0, tl.where(m == float("-inf"), 0.0, m) + tl.log(s), float("-inf"))
    top = tl.maximum(logit_y, lse_others)
    lse = top + tl.log(tl.exp(logit_y - top) + tl.exp(lse_others - top))
    return logit_y, lse_others, lse


@triton.jit
def _forward_kernel(
    x_ptr,
    x_row_stride,
    labels_ptr,
    logp_ptr,
    log1m_ptr,
    lse_ptr,
    vocab,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(log1m_ptr + row, 0.0)
        tl.store(lse_ptr + row, float("inf"))
        return
    logit_y, lse_others, lse = _row_stats(x_ptr + row * x_row_stride, label, vocab, BLOCK)
    tl.store(logp_ptr + row, logit_y - lse)
    tl.store(log1m_ptr + row, lse_others - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _catnip_rows_kernel(
    x_ptr,
    x_row_stride,
    labels_ptr,
    length,
    token_stride,
    beta,
    out_ptr,
    n_rows,
    vocab,
    ignore_index,
    BLOCK: tl.constexpr,
    LABEL_BLOCK: tl.constexpr,
    STRIDED: tl.constexpr,
):
    """CATNIP's per-row quantities before the per-sample mean, into out [3, R]: softplus(u)
    and its derivative in log z, beta * sigmoid(u), with u = beta * (log z - log(1 - z))
    (eq. 8 and 9), and the row's log-sum-exp. A row that does not count (the ignore
    index, or left out by the token stride) gets 0, 0, +inf without its logits being read.
    With STRIDED the row finds its rank among its sample's counted labels (labels [B, T],
    T = length) by counting the ones before it."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    counted = label != ignore_index
    if STRIDED:
        if counted:
            sample_start = labels_ptr + (row // length) * length
            position = row % length
            rank = 0
            for start in range(0, position, LABEL_BLOCK):
                cols = start + tl.arange(0, LABEL_BLOCK)
                before = tl.load(sample_start + cols, mask=cols < position, other=ignore_index)
                rank += tl.sum((before != ignore_index).to(tl.int32), axis=0)
            counted = rank % token_stride == 0
    if not counted:
        tl.store(out_ptr + row, 0.0)
        tl.store(out_ptr + n_rows + row, 0.0)
        tl.store(out_ptr + 2 * n_rows + row, float("inf"))
        return
    logit_y, lse_others, lse = _row_stats(x_ptr + row * x_row_stride, label, vocab, BLOCK)
    u = beta * (logit_y - lse_others)  # log z - log(1 - z) = logit_y - lse_others
    # softplus(u) = max(u, 0) + log1p(exp(-|u|)); log1p(t) as log(w) * t / (w - 1), w = 1 + t
    # (Goldberg), since log(1 + t) loses t's digits once t is below ~1e-3 (u < -7)
    t = tl.exp(-tl.abs(u))
    w = 1.0 + t
    softplus = tl.maximum(u, 0.0) + tl.where(w == 1.0, t, tl.log(w) * t / (w - 1.0))
    tl.store(out_ptr + row, softplus)
    tl.store(out_ptr + n_rows + row, beta / (1.0 + tl.exp(-u)))
    tl.store(out_ptr + 2 * n_rows + row, lse)


@triton.jit
def _counted_labels(sample_ptr, length, ignore_index, BLOCK: tl.constexpr):
    """How many of a sample's `length` labels are not the ignore index."""
    n = 0
    for start in range(0, length, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        labels = tl.load(sample_ptr + cols, mask=cols < length, other=ignore_index)
        n += tl.sum((labels != ignore_index).to(tl.int32), axis=0)
    return n


@triton.jit
def _catnip_finish_kernel(
    labels_ptr,
    out_ptr,
    loss_ptr,
    n_samples,
    length,
    token_stride,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """CATNIP's per-sample mean, then mean over samples, in one program over labels
    [B, T] and the rows kernel's out [3, B * T]: each counted row's weight is
    1 / (k_b * S), k_b its sample's number of counted rows and S the number of samples
    with any. Writes the loss, sum(weight * softplus), in a fixed order, and the weighted
    derivative over out[1] (which the backward reads); rows that do not count get 0."""
    n_rows = n_samples * length
    samples = 0
    for b in range(0, n_samples):
        samples += (_counted_labels(labels_ptr + b * length, length, ignore_index, BLOCK) > 0).to(
            tl.int32
        )
    total = 0.0
    for b in range(0, n_samples):
        counted_total = (
            _counted_labels(labels_ptr + b * length, length, ignore_index, BLOCK) + token_stride - 1
        ) // token_stride
        weight = 1.0 / tl.maximum(counted_total * samples, 1).to(
            tl.float32
        )  # used only if it counts
        seen = 0
        for start in range(0, length, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < length
            labels = tl.load(labels_ptr + b * length + cols, mask=inside, other=ignore_index)
            valid = (labels != ignore_index).to(tl.int32)
            rank = seen + tl.cumsum(valid, axis=0) - 1
            counted = (valid == 1) & (rank % token_stride == 0)
            rows = b * length + cols
            softplus = tl.load(out_ptr + rows, mask=counted, other=0.0)
            total += tl.sum(tl.where(counted, weight * softplus, 0.0), axis=0)
            dlogp = tl.load(out_ptr + n_rows + rows, mask=counted, other=0.0)
            tl.store(out_ptr + n_rows + rows, tl.where(counted, weight * dlogp, 0.0), mask=inside)
            seen += tl.sum(valid, axis=0)
    tl.store(loss_ptr, total)


@triton.jit
def _kl_rows_kernel(
    x_ptr,
    x_row_stride,
    r_ptr,
    r_row_stride,
    labels_ptr,
    out_ptr,
    n_rows,
    vocab,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """The retain KL's per-row quantities, into out [4, R]: KL[q || r] of the row
    (q = softmax(x), r = softmax(ref)), 1 (its derivative in itself, which the finish
    kernel weights), and the two rows' log-sum-exps. Two passes: the log-sum-exps
    (online), then sum q * ((x - lse_x) - (ref - lse_r)), each term as eager forms it.
    A row with the ignore index gets 0, 0, +inf, +inf, its logits unread."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(out_ptr + row, 0.0)
        tl.store(out_ptr + n_rows + row, 0.0)
        tl.store(out_ptr + 2 * n_rows + row, float("inf"))
        tl.store(out_ptr + 3 * n_rows + row, float("inf"))
        return
    x_base = x_ptr + row * x_row_stride
    r_base = r_ptr + row * r_row_stride
    m_x = float("-inf")
    s_x = 0.0
    m_r = float("-inf")
    s_r = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        ref = tl.load(r_base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_x, s_x = _online_lse_step(m_x, s_x, x)
        m_r, s_r = _online_lse_step(m_r, s_r, ref)
    lse_x = m_x + tl.log(s_x)
    lse_r = m_r + tl.log(s_r)
    kl = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        logq = tl.load(x_base + cols, mask=inside, other=0.0).to(tl.float32) - lse_x
        logr = tl.load(r_base + cols, mask=inside, other=0.0).to(tl.float32) - lse_r
        kl += tl.sum(tl.where(inside, tl.exp(logq) * (logq - logr), 0.0), axis=0)
    tl.store(out_ptr + row, kl)
    tl.store(out_ptr + n_rows + row, 1.0)
    tl.store(out_ptr + 2 * n_rows + row, lse_x)
    tl.store(out_ptr + 3 * n_rows + row, lse_r)


@triton.jit
def _kl_backward_kernel(
    x_ptr,
    x_row_stride,
    r_ptr,
    r_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    out_ptr,
    scale_ptr,
    n_rows,
    vocab,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """grad[row] = g * q * (log q - log r - kl), g = the row's weight (out[1], written by
    the finish kernel) times the incoming gradient; rows of weight 0 get zeros unread."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g = tl.load(out_ptr + n_rows + row) * tl.load(scale_ptr).to(tl.float32)
    out = grad_ptr + row * grad_row_stride
    if (label == ignore_index) | (g == 0):
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(
                out + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < vocab
            )
        return
    kl = tl.load(out_ptr + row)
    lse_x = tl.load(out_ptr + 2 * n_rows + row)
    lse_r = tl.load(out_ptr + 3 * n_rows + row)
    x_base = x_ptr + row * x_row_stride
    r_base = r_ptr + row * r_row_stride
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        logq = tl.load(x_base + cols, mask=inside, other=0.0).to(tl.float32) - lse_x
        logr = tl.load(r_base + cols, mask=inside, other=0.0).to(tl.float32) - lse_r
        grad = g * tl.exp(logq) * (logq - logr - kl)
        tl.store(out + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _backward_kernel(
    x_ptr,
    x_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    lse_ptr,
    dlogp_ptr,
    scale_ptr,
    vocab,
    ignore_index,
    BLOCK: tl.constexpr,
    SCALED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g = tl.load(dlogp_ptr + row)
    if SCALED:  # the incoming gradient of a scalar loss, read here rather than multiplied in
        g = g * tl.load(scale_ptr).to(tl.float32)
    out = grad_ptr + row * grad_row_stride
    if (label == ignore_index) | (g == 0):  # nothing flows back: zeros, the logits unread
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(
                out + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < vocab
            )
        return
    lse = tl.load(lse_ptr + row)
    base = x_ptr + row * x_row_stride
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        grad = g * (tl.where(cols == label, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(out + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < vocab)


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


def forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] (last dimension contiguous), labels [R] -> (logp, log1m, lse) [R],
    float32; rows with the ignore index give 0, 0, +inf."""
    rows, vocab = logits.shape
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    log1m, lse = torch.empty_like(logp), torch.empty_like(logp)
    if rows:
        block, warps = _forward_config(vocab)
        _launch(
            _forward_kernel,
            rows,
            (logits, logits.stride(0), labels, logp, log1m, lse, vocab, ignore_index),
            {"BLOCK": block},
            warps,
        )
    return logp, log1m, lse


def _rows_then_mean(
    rows_kernel: Any,
    args: tuple,
    constants: dict,
    out: torch.Tensor,
    labels: torch.Tensor,
    token_stride: int,
    ignore_index: int,
) -> torch.Tensor:
    """A rows kernel (one program per row of logits [R, V], args[0]; it writes each row's
    term into out[0] and its derivative into out[1]), then the per-sample-mean program
    over them: the loss [], float32. `constants` are the rows kernel's besides BLOCK."""
    rows, vocab = args[0].shape
    n_samples, length = labels.shape
    loss = torch.empty((), dtype=torch.float32, device=out.device)
    if not rows:
        return loss.zero_()
    block, warps = _forward_config(vocab)
    _launch(rows_kernel, rows, args, {"BLOCK": block, **constants}, warps)
    _launch(
        _catnip_finish_kernel,
        1,
        (labels, out, loss, n_samples, length, token_stride, ignore_index),
        {"BLOCK": _label_block(length, 4096)},
        4,
    )
    return loss


def catnip_forward(
    logits: torch.Tensor, labels: torch.Tensor, beta: float, token_stride: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B * T, V], labels [B, T] (contiguous) -> (loss [], dlogp [B * T], lse [B * T]),
    float32: CATNIP's loss (per-sample mean over the counted tokens, then the mean over
    samples with any), d loss / d log z per row, and the log-sum-exp for `backward`."""
    rows, vocab = logits.shape
    length = labels.shape[1]
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    loss = _rows_then_mean(
        _catnip_rows_kernel,
        (
            logits,
            logits.stride(0),
            labels,
            length,
            token_stride,
            float(beta),
            out,
            rows,
            vocab,
            ignore_index,
        ),
        {"LABEL_BLOCK": _label_block(length, 1024), "STRIDED": token_stride > 1},
        out,
        labels,
        token_stride,
        ignore_index,
    )
    return loss, out[1], out[2]


def retain_kl_forward(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, ref_logits [B * T, V], labels [B, T] (contiguous) -> (loss [], out [4, B * T]),
    float32: the retain KL's per-sample mean over the counted rows, then the mean over
    samples with any, and what `retain_kl_backward` reads."""
    rows, vocab = logits.shape
    out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
    loss = _rows_then_mean(
        _kl_rows_kernel,
        (
            logits,
            logits.stride(0),
            ref_logits,
            ref_logits.stride(0),
            labels,
            out,
            rows,
            vocab,
            ignore_index,
        ),
        {},
        out,
        labels,
        1,
        ignore_index,
    )
    return loss, out


def retain_kl_backward(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """The gradient of scale * (the retain KL loss) with respect to logits [R, V], in their
    dtype; `scale` is a one-element tensor."""
    rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows:
        block, warps = _backward_config(vocab)
        _launch(
            _kl_backward_kernel,
            rows,
            (
                logits,
                logits.stride(0),
                ref_logits,
                ref_logits.stride(0),
                grad,
                grad.stride(0),
                labels,
                out,
                scale,
                rows,
                vocab,
                ignore_index,
            ),
            {"BLOCK": block},
            warps,
        )
    return grad


def backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    ignore_index: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient of sum(scale * grad_logp * logp) with respect to logits [R, V], in
    their dtype; `scale` is a one-element tensor (default 1)."""
    rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows:
        block, warps = _backward_config(vocab)
        _launch(
            _backward_kernel,
            rows,
            (
                logits,
                logits.stride(0),
                grad,
                grad.stride(0),
                labels,
                lse,
                grad_logp.contiguous(),
                grad_logp if scale is None else scale,
                vocab,
                ignore_index,
            ),
            {"BLOCK": block, "SCALED": scale is not None},
            warps,
        )
    return grad


# --- autograd functions ---------------------------------------------------------


class _TokenLogProbs(torch.autograd.Function):
    """token_logprobs on the kernels, over every row: forward(logits [R, V], labels [R])
    -> (logp [R], log1m [R]), float32, 0 where the label is IGNORE_INDEX. Saves `logits`
    (the caller's tensor), the labels and lse [R]."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logp, log1m, lse = forward(logits, labels, IGNORE_INDEX)
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(log1m)
        return logp, log1m

    @staticmethod
    def backward(
        ctx: Any, grad_logp: torch.Tensor, _grad_log1m: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        logits, labels, lse = ctx.saved_tensors
        return backward(logits, labels, lse, grad_logp.float(), IGNORE_INDEX), None


class _Catnip(torch.autograd.Function):
    """catnip_loss on the kernels: forward(logits [R, V], labels [B, T] with B * T = R,
    token_stride, beta) -> the scalar loss. Two kernels: one program per row for
    softplus(u) and d loss / d log z, then one program for the per-sample mean (it writes
    the loss and each row's weighted derivative), so the backward is one kernel."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor, token_stride: int, beta: float
    ) -> torch.Tensor:
        loss, dlogp, lse = catnip_forward(logits, labels, beta, token_stride, IGNORE_INDEX)
        ctx.save_for_backward(logits, labels, lse, dlogp)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, labels, lse, dlogp = ctx.saved_tensors
        grad = backward(logits, labels.view(-1), lse, dlogp, IGNORE_INDEX, scale=grad_loss)
        return grad, None, None, None


class _RetainKL(torch.autograd.Function):
    """kl_retain_loss on the kernels: forward(logits [R, V], ref_logits [R, V], labels
    [B, T] with B * T = R) -> the scalar loss. One program per row for its KL and
    log-sum-exps, then CATNIP's per-sample-mean program (with a token stride of 1) for
    the loss and each row's weight; the backward is one kernel."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        loss, out = retain_kl_forward(logits, ref_logits, labels, IGNORE_INDEX)
        ctx.save_for_backward(logits, ref_logits, labels, out)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, ref_logits, labels, out = ctx.saved_tensors
        grad = retain_kl_backward(logits, ref_logits, labels.view(-1), out, grad_loss, IGNORE_INDEX)
        return grad, None, None


def token_logprobs(rows: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits as rows [R, V] (last dimension contiguous), labels [B, T] -> (logp, log1m)
    [B, T], float32, 0 where a position does not count."""
    logp, log1m = _TokenLogProbs.apply(rows, labels.reshape(-1).contiguous())
    return logp.view(labels.shape), log1m.view(labels.shape)


def catnip_loss(
    rows: torch.Tensor, labels: torch.Tensor, beta: float, token_stride: int
) -> torch.Tensor:
    """The whole CATNIP loss in three kernels: rows, per-sample mean, backward."""
    return _Catnip.apply(rows, labels.contiguous(), token_stride, beta)


def kl_retain_loss(
    rows: torch.Tensor, ref_rows: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The whole retain KL in three kernels, as catnip_loss."""
    return _RetainKL.apply(rows, ref_rows, labels.contiguous())
