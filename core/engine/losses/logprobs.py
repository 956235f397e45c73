"""Per-token log-probabilities, the expensive part of every loss, on the eager and
compiled backends (the triton backend is `triton_kernels`).

For each counted position it returns
    log z     = log pi_theta(y_t | x, y_<t)          (differentiable)
    log (1-z) = log of the mass on every other token  (detached: the paper's sg(.))
without ever forming log(1 - exp(log z)), which cancels to -inf in float32 once z
rounds to 1 (logit margins above ~17). The trick: with
    lse_o = logsumexp over the vocabulary *without* the target,
we get log(1-z) = lse_o - lse_all and lse_all = logaddexp(logit_y, lse_o), so both
terms are exact at any margin, in fp32 and in bf16 (chunks are upcast to fp32).

The retain KL's eager autograd function lives here too: it is the other loss that
reads whole rows of logits, in the same chunks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from core.engine.losses.backend import (
    IGNORE_INDEX,
    check_shapes,
    cpu_threads,
    flat_rows,
    get_backend,
    use_triton,
)

# Elements processed at once, per device type; the fp32 scratch memory is one chunk
# (elements * 4 bytes) whatever the batch size. CPU: 2 MiB, which stays in cache, so no
# large temporary is allocated and page-faulted in. Accelerators: 64 MiB, big enough
# that kernel launches do not dominate. How these were chosen: docs/performance.md.
CHUNK_ELEMENTS = {"cpu": 1 << 19, "default": 1 << 24}

# The eager backward writes every row straight into the gradient when at least this
# fraction of the rows count (raw text: all but the last position and the padding), and
# gathers the counted rows otherwise (QA: the prompts do not count). The dense way
# computes the rows that do not count too, so it wins only when few are masked
# (measured at 50-99.6% counted rows: docs/performance.md).
DENSE_MIN_FRACTION = 0.9


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log z and detached log(1 - z).

    Args:
        logits: [B, T, V] (any float dtype).
        labels: [B, T] aligned with logits; IGNORE_INDEX where a position does not count.
    Returns:
        (logp, log1m): [B, T] in float32 (float64 for float64 logits); 0 where a
        position does not count.
    """
    check_shapes(logits, labels)
    if use_triton(logits):  # every row, no gather of the counted ones (no host sync)
        from core.engine.losses import triton_kernels

        return triton_kernels.token_logprobs(flat_rows(logits), labels)
    mask, rows = counted_rows(labels)
    targets = labels.reshape(-1).index_select(0, rows)
    logp_rows, log1m_rows = _TokenLogProbs.apply(
        logits.reshape(-1, logits.shape[-1]), rows, targets
    )
    return unflatten_rows(logp_rows, rows, mask), unflatten_rows(log1m_rows, rows, mask)


def retain_kl_rows(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """KL[softmax(logits) || softmax(ref_logits)] at each counted position: [B, T] in the
    accumulation dtype, 0 where a position does not count (eager and compiled backends)."""
    mask, rows = counted_rows(labels)
    vocab = logits.shape[-1]
    kl_rows = _RetainKL.apply(
        logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab), rows
    )
    return unflatten_rows(kl_rows, rows, mask)


def counted_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T], rows [N]): which positions count, and their flat indices."""
    mask = labels != IGNORE_INDEX
    return mask, mask.reshape(-1).nonzero().squeeze(1)


def unflatten_rows(values: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row values [N] back to [B, T], 0 where a position does not count."""
    return values.new_zeros(mask.numel()).index_put((rows,), values).view(mask.shape)


# --- the eager backend --------------------------------------------------------


def _row_chunk(logits: torch.Tensor) -> int:
    elements = CHUNK_ELEMENTS.get(logits.device.type, CHUNK_ELEMENTS["default"])
    return max(1, elements // logits.shape[1])


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype the row maths runs in: float64 for float64 logits, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_grad(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of a backward that writes only `rows`: zeroed unless every
    row gets written."""
    return (
        torch.empty_like(logits) if rows.shape[0] == logits.shape[0] else torch.zeros_like(logits)
    )


def _chunked_forward(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager forward: [R, V], [N], [N] -> (logp, log1m, lse_all), each [N] in the
    accumulation dtype (float32; float64 for float64 logits). Rows are processed in
    chunks, so the scratch memory is one fp32 chunk whatever the batch size."""
    acc = _acc_dtype(logits)
    logp = torch.empty(rows.shape[0], dtype=acc, device=logits.device)
    log1m = torch.empty_like(logp)
    lse_all = torch.empty_like(logp)
    step = _row_chunk(logits)
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        chunk = logits.index_select(0, rows[part]).to(acc)  # [n, V], always a copy
        target = targets[part].unsqueeze(1)  # [n, 1]
        logit_y = chunk.gather(1, target).squeeze(1)  # [n]
        chunk.scatter_(1, target, float("-inf"))
        # logsumexp over every other token, in place on the copy (torch.logsumexp would
        # allocate another [n, V]); a row whose others are all -inf (V = 1) gives -inf
        top = chunk.amax(dim=1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # [n, 1]
        lse_others = chunk.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))  # [n]
        lse = torch.logaddexp(logit_y, lse_others)
        lse_all[part] = lse
        logp[part] = logit_y - lse
        log1m[part] = lse_others - lse
    return logp, log1m, lse_all


def _chunked_backward(
    logits: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
) -> torch.Tensor:
    """Eager backward: g * (onehot(y) - softmax) on the selected rows, 0 elsewhere.
    `rows` are distinct and increasing (token_logprobs passes nonzero())."""
    if logits.dtype == grad_logp.dtype and rows.shape[0] >= DENSE_MIN_FRACTION * logits.shape[0]:
        return _dense_backward(logits, rows, targets, lse, grad_logp)
    return _gathered_backward(logits, rows, targets, lse, grad_logp)


def _dense_backward(
    logits: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
) -> torch.Tensor:
    """Every row's softmax computed straight into the gradient (logits already in the
    accumulation dtype): no gathered copy, no copy back, no zero-fill. A row that does
    not count gets g = 0 and lse = +inf, so exp(x - lse) = 0 and its gradient is 0 (NaN
    only where its logits are +inf or NaN, as with cross-entropy's ignore_index)."""
    n_rows = logits.shape[0]
    if rows.shape[0] < n_rows:  # spread the per-row terms over every row
        grad_logp = grad_logp.new_zeros(n_rows).index_copy_(0, rows, grad_logp)
        lse = lse.new_full((n_rows,), float("inf")).index_copy_(0, rows, lse)
        targets = targets.new_zeros(n_rows).index_copy_(0, rows, targets)
    grad = torch.empty_like(logits)
    step = _row_chunk(logits)
    for start in range(0, n_rows, step):
        part = slice(start, start + step)
        g = grad_logp[part].unsqueeze(1)  # [n, 1]
        out = grad[part]  # [n, V], a view
        torch.sub(logits[part], lse[part].unsqueeze(1), out=out).exp_()  # softmax
        out.mul_(-g).scatter_add_(1, targets[part].unsqueeze(1), g)
    return grad


def _gathered_backward(
    logits: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
) -> torch.Tensor:
    """The counted rows gathered chunk by chunk (upcast to the accumulation dtype),
    computed in place on the copy and copied into a zeroed gradient."""
    grad = _row_grad(logits, rows)
    step = _row_chunk(logits)
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        g = grad_logp[part].unsqueeze(1)  # [n, 1], the accumulation dtype
        chunk = logits.index_select(0, rows[part]).to(g.dtype)  # [n, V], always a copy
        chunk.sub_(lse[part].unsqueeze(1)).exp_()  # softmax
        chunk.mul_(-g).scatter_add_(1, targets[part].unsqueeze(1), g)
        grad.index_copy_(0, rows[part], chunk.to(grad.dtype))
    return grad


def _rows_forward(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_chunked_forward's maths on whole rows, functional (for torch.compile, which fuses
    the gather, the target exclusion and the reduction, so nothing [N, V] is kept)."""
    x = logits.index_select(0, rows).to(_acc_dtype(logits))
    is_target = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    logit_y = x.gather(1, targets[:, None]).squeeze(1)
    lse_others = torch.logsumexp(torch.where(is_target, float("-inf"), x), dim=1)
    lse = torch.logaddexp(logit_y, lse_others)
    return logit_y - lse, lse_others - lse, lse


def _rows_backward(
    logits: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
) -> torch.Tensor:
    """_chunked_backward's maths, functional (for torch.compile)."""
    x = logits.index_select(0, rows).to(lse.dtype)
    is_target = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad_rows = grad_logp[:, None] * (is_target.to(lse.dtype) - torch.exp(x - lse[:, None]))
    return torch.zeros_like(logits).index_copy(0, rows, grad_rows.to(logits.dtype))


@functools.cache
def _compiled() -> tuple:
    """torch.compile'd forward and backward, built on first use. dynamic=True: one
    compilation serves every batch shape. Compiling in this process (compile_threads=1)
    keeps it working inside daemonic worker processes, which may not fork helpers."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    return (torch.compile(_rows_forward, dynamic=True), torch.compile(_rows_backward, dynamic=True))


@contextlib.contextmanager
def _process_threads(device: torch.device) -> Iterator[None]:
    yield


def _kernels() -> tuple:
    """(forward, backward) of the process's backend (eager or compiled)."""
    return _compiled() if get_backend() == "compiled" else (_chunked_forward, _chunked_backward)


class _TokenLogProbs(torch.autograd.Function):
    """log z and detached log(1 - z) for the target token of selected rows.

    forward(logits [R, V], rows [N], targets [N]) -> (logp [N], log1m [N]), float32.
    backward: d logp / d logits[row] = onehot(y) - softmax(logits[row]); other rows get
    0 and log1m has no gradient. Only `logits` (the caller's tensor) and three [N]
    vectors are saved, not a copy of the logits. The backward runs on the backend the
    forward ran on.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        forward, ctx.backward_kernel = _kernels()
        # the eager row loops run on the losses' CPU threads; compiled code is fused
        ctx.threads = cpu_threads if forward is _chunked_forward else _process_threads
        with ctx.threads(logits.device):
            logp, log1m, lse = forward(logits, rows, targets)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.mark_non_differentiable(log1m)
        return logp, log1m

    @staticmethod
    def backward(
        ctx: Any, grad_logp: torch.Tensor, _grad_log1m: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        logits, rows, targets, lse = ctx.saved_tensors
        with ctx.threads(logits.device):
            grad = ctx.backward_kernel(logits, rows, targets, lse, grad_logp.to(lse.dtype))
        return grad, None, None


class _RetainKL(torch.autograd.Function):
    """KL[q || r] of selected rows, q = softmax(logits), r = softmax(ref_logits).

    forward(logits [R, V], ref_logits [R, V], rows [N]) -> kl [N] in the accumulation
    dtype (float32; float64 for float64 logits), computed chunk by chunk.
    backward: d kl / d logits[row] = q * (log q - log r - kl); other rows get 0 and the
    reference gets nothing. Only the two logits tensors, rows and kl are saved (nothing
    [N, V] of its own): the backward recomputes both log-softmaxes per chunk.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, ref_logits: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        with cpu_threads(logits.device):
            kl = _RetainKL._forward(logits, ref_logits, rows)
        ctx.save_for_backward(logits, ref_logits, rows, kl)
        return kl

    @staticmethod
    def _forward(
        logits: torch.Tensor, ref_logits: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        acc = _acc_dtype(logits)
        kl = torch.empty(rows.shape[0], dtype=acc, device=logits.device)
        step = _row_chunk(logits)
        for start in range(0, rows.shape[0], step):
            part = rows[start : start + step]
            logq = F.log_softmax(logits.index_select(0, part).to(acc), dim=1)  # [n, V]
            diff = F.log_softmax(ref_logits.index_select(0, part).to(acc), dim=1)
            diff.neg_().add_(logq)  # log q - log r
            kl[start : start + step] = logq.exp_().mul_(diff).sum(dim=1)
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, ref_logits, rows, kl = ctx.saved_tensors
        with cpu_threads(logits.device):
            return _RetainKL._backward(logits, ref_logits, rows, kl, grad_kl)

    @staticmethod
    def _backward(
        logits: torch.Tensor,
        ref_logits: torch.Tensor,
        rows: torch.Tensor,
        kl: torch.Tensor,
        grad_kl: torch.Tensor,
    ) -> tuple[torch.Tensor, None, None]:
        grad_kl = grad_kl.to(kl.dtype)
        grad = _row_grad(logits, rows)
        step = _row_chunk(logits)
        for start in range(0, rows.shape[0], step):
            part = rows[start : start + step]
            logq = F.log_softmax(logits.index_select(0, part).to(kl.dtype), dim=1)
            diff = F.log_softmax(ref_logits.index_select(0, part).to(kl.dtype), dim=1)
            diff.neg_().add_(logq).sub_(kl[start : start + step].unsqueeze(1))  # log q - log r - kl
            chunk = logq.exp_().mul_(diff).mul_(grad_kl[start : start + step].unsqueeze(1))
            grad.index_copy_(0, part, chunk.to(grad.dtype))
        return grad, None, None
