"""Triton kernels for token_logprobs and CATNIP on a GPU (core.losses' "triton" backend).

The same maths as core.losses' eager backend, one program per row of logits [R, V]:
    forward:  logit_y, lse_o = logsumexp over every token but the target (online, in
              blocks of the row), lse = logaddexp(logit_y, lse_o);
              logp = logit_y - lse, log1m = lse_o - lse (exact at any margin)
    backward: grad[row] = g * (onehot(y) - exp(x - lse)), written in the logits' dtype
A row whose label is the ignore index gets logp = log1m = 0 and a zero gradient row
without its logits being read, so prompt and padding cost a write, not a pass.
CATNIP itself has kernels of its own: one program for its token weights (the
per-sample mean with the token stride), and a forward kernel for its per-token terms and
their derivative in log z (eq. 8, 9). The whole loss is then three kernels and a sum: on
a GPU at training sizes each small op costs more in launch than in arithmetic.

Why: on a GPU the eager backend is launch-bound at training sizes (about 40 kernels and
three host syncs per forward and backward; measured on an H100, [2, 256, 32000] fp32:
2.4 ms against cross-entropy's 0.46), and torch.compile's regions cost as much again in
call overhead. With these kernels and no host sync, CATNIP's forward and backward is
1.7x cross-entropy there, and 0.46x at [8, 2048, 32000] (figures in the README).

Imported only when that backend runs: Triton is a CUDA-side dependency (it ships with
CUDA builds of torch, not with the CPU wheel). With TRITON_INTERPRET=1 the kernels run
on CPU tensors through Triton's interpreter, which is how they are checked without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per block: a whole 32k-vocabulary row in one block, larger ones in a few
# (Liger-Kernel's cross-entropy uses the same bound).
MAX_BLOCK = 32768


def _launch_config(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    return block, (32 if block >= 16384 else 16 if block >= 4096 else 8 if block >= 1024 else 4)


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
        x = tl.where(cols == label, float("-inf"), x)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse_others = tl.where(s > 0, tl.where(m == float("-inf"), 0.0, m) + tl.log(s), float("-inf"))
    top = tl.maximum(logit_y, lse_others)
    lse = top + tl.log(tl.exp(logit_y - top) + tl.exp(lse_others - top))
    return logit_y, lse_others, lse


@triton.jit
def _forward_kernel(x_ptr, x_row_stride, labels_ptr, logp_ptr, log1m_ptr, lse_ptr, vocab,
                    ignore_index, BLOCK: tl.constexpr):
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
def _catnip_forward_kernel(x_ptr, x_row_stride, labels_ptr, weights_ptr, beta, term_ptr, dlogp_ptr,
                           lse_ptr, vocab, ignore_index, BLOCK: tl.constexpr):
    """CATNIP's per-token term w * softplus(u) and its derivative in log z,
    w * beta * sigmoid(u), with u = beta * (log z - log(1 - z)) (eq. 8 and 9). A row of
    weight 0 (not counted, or left out by the token stride) is not read."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    weight = tl.load(weights_ptr + row)
    if (label == ignore_index) | (weight == 0):
        tl.store(term_ptr + row, 0.0)
        tl.store(dlogp_ptr + row, 0.0)
        tl.store(lse_ptr + row, float("inf"))
        return
    logit_y, lse_others, lse = _row_stats(x_ptr + row * x_row_stride, label, vocab, BLOCK)
    u = beta * (logit_y - lse_others)  # log z - log(1 - z) = logit_y - lse_others
    # softplus(u) = max(u, 0) + log1p(exp(-|u|)); log1p(t) as log(w) * t / (w - 1), w = 1 + t
    # (Goldberg), since log(1 + t) loses t's digits once t is below ~1e-3 (u < -7)
    t = tl.exp(-tl.abs(u))
    w = 1.0 + t
    softplus = tl.maximum(u, 0.0) + tl.where(w == 1.0, t, tl.log(w) * t / (w - 1.0))
    tl.store(term_ptr + row, weight * softplus)
    tl.store(dlogp_ptr + row, weight * beta / (1.0 + tl.exp(-u)))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _weights_kernel(labels_ptr, weights_ptr, n_samples, length, token_stride, ignore_index,
                    BLOCK: tl.constexpr):
    """CATNIP's token weights over labels [B, T] in one program: 1 / (k_b * S) where the
    position counts, else 0. A position counts if its label is not the ignore index and
    its rank among the sample's such positions is a multiple of token_stride; k_b is the
    sample's number of counted positions, S the number of samples with any."""
    samples = 0
    for b in range(0, n_samples):
        n = 0
        for start in range(0, length, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            labels = tl.load(labels_ptr + b * length + cols, mask=cols < length, other=ignore_index)
            n += tl.sum((labels != ignore_index).to(tl.int32), axis=0)
        samples += (n > 0).to(tl.int32)
    for b in range(0, n_samples):
        n = 0
        for start in range(0, length, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            labels = tl.load(labels_ptr + b * length + cols, mask=cols < length, other=ignore_index)
            n += tl.sum((labels != ignore_index).to(tl.int32), axis=0)
        counted_total = (n + token_stride - 1) // token_stride
        weight = 1.0 / (counted_total.to(tl.float32) * samples.to(tl.float32))  # used only if > 0
        seen = 0
        for start in range(0, length, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            labels = tl.load(labels_ptr + b * length + cols, mask=cols < length, other=ignore_index)
            valid = (labels != ignore_index).to(tl.int32)
            rank = seen + tl.cumsum(valid, axis=0) - 1
            counted = (valid == 1) & (rank % token_stride == 0)
            tl.store(weights_ptr + b * length + cols, tl.where(counted, weight, 0.0), mask=cols < length)
            seen += tl.sum(valid, axis=0)


@triton.jit
def _backward_kernel(x_ptr, x_row_stride, grad_ptr, grad_row_stride, labels_ptr, lse_ptr, dlogp_ptr,
                     scale_ptr, vocab, ignore_index, BLOCK: tl.constexpr, SCALED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g = tl.load(dlogp_ptr + row)
    if SCALED:  # the incoming gradient of a scalar loss, read here rather than multiplied in
        g = g * tl.load(scale_ptr).to(tl.float32)
    out = grad_ptr + row * grad_row_stride
    if (label == ignore_index) | (g == 0):  # nothing flows back: zeros, the logits unread
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(out + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < vocab)
        return
    lse = tl.load(lse_ptr + row)
    base = x_ptr + row * x_row_stride
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        grad = g * (tl.where(cols == label, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(out + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < vocab)


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """logits [R, V] (last dimension contiguous), labels [R] -> (logp, log1m, lse) [R],
    float32; rows with the ignore index give 0, 0, +inf."""
    rows, vocab = logits.shape
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    log1m, lse = torch.empty_like(logp), torch.empty_like(logp)
    if rows:
        block, warps = _launch_config(vocab)
        _forward_kernel[(rows,)](logits, logits.stride(0), labels, logp, log1m, lse, vocab, ignore_index,
                                 BLOCK=block, num_warps=warps)
    return logp, log1m, lse


def catnip_weights(labels: torch.Tensor, token_stride: int, ignore_index: int) -> torch.Tensor:
    """labels [B, T] -> CATNIP's token weights [B * T], float32 (see _weights_kernel): the
    loss is sum(weight * term), the per-sample mean, then the mean over samples with any."""
    labels = labels.contiguous()
    n_samples, length = labels.shape
    weights = torch.empty(labels.numel(), dtype=torch.float32, device=labels.device)
    if labels.numel():
        block = min(4096, triton.next_power_of_2(length))
        _weights_kernel[(1,)](labels, weights, n_samples, length, token_stride, ignore_index, BLOCK=block,
                              num_warps=4)
    return weights


def catnip_forward(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, beta: float,
                   ignore_index: int):
    """logits [R, V], labels [R], weights [R] float32 -> (terms, dlogp, lse) [R], float32:
    CATNIP's per-token terms (the loss is their sum), d loss / d log z, and the
    log-sum-exp for `backward`."""
    rows, vocab = logits.shape
    terms = torch.empty(rows, dtype=torch.float32, device=logits.device)
    dlogp, lse = torch.empty_like(terms), torch.empty_like(terms)
    if rows:
        block, warps = _launch_config(vocab)
        _catnip_forward_kernel[(rows,)](logits, logits.stride(0), labels, weights, float(beta), terms, dlogp,
                                        lse, vocab, ignore_index, BLOCK=block, num_warps=warps)
    return terms, dlogp, lse


def backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
             ignore_index: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of sum(scale * grad_logp * logp) with respect to logits [R, V], in
    their dtype; `scale` is a one-element tensor (default 1)."""
    rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows:
        block, warps = _launch_config(vocab)
        _backward_kernel[(rows,)](logits, logits.stride(0), grad, grad.stride(0), labels, lse,
                                  grad_logp.contiguous(), grad_logp if scale is None else scale, vocab,
                                  ignore_index, BLOCK=block, SCALED=scale is not None, num_warps=warps)
    return grad
