"""The loss kernels: CATNIP's rows (softplus(u) and its derivative, eq. 8 and 9), the
per-sample mean both losses finish with, and the retain KL's rows and backward."""

from __future__ import annotations

import triton
import triton.language as tl

from core.engine.losses.triton_kernels.token_kernels import _online_lse_step, _row_stats


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
