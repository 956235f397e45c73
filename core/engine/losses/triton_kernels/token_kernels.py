"""The per-token kernels: the log-probabilities' forward and backward over rows of logits
[R, V], one program per row, and the row statistics the loss kernels share.

    forward:  logit_y, lse_o = logsumexp over every token but the target (online, in
              blocks of the row), lse = logaddexp(logit_y, lse_o);
              logp = logit_y - lse, log1m = lse_o - lse (exact at any margin)
    backward: grad[row] = g * (onehot(y) - exp(x - lse)), written in the logits' dtype
"""

from __future__ import annotations

import triton
import triton.language as tl


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
