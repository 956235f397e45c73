"""Unlearning losses: CATNIP (paper eq. 8), its ablations and the baselines of 5.1.3.

Every loss here is a pure tensor function. Shapes use
    B = batch, T = sequence positions, V = vocabulary, N = counted positions.
`labels[b, t]` is the target of `logits[b, t]` (already shifted); -100 marks a
position that does not count (prompt, padding).

The expensive part of every loss is the per-token log-probability. It is computed by
`token_logprobs`, a fused, chunked autograd function that returns, for each position,
    log z     = log pi_theta(y_t | x, y_<t)          (differentiable)
    log (1-z) = log of the mass on every other token  (detached: the paper's sg(.))
without ever forming log(1 - exp(log z)), which cancels to -inf in float32 once
z rounds to 1 (logit margins above ~17). The trick: with
    lse_o = logsumexp over the vocabulary *without* the target,
we get log(1-z) = lse_o - lse_all and lse_all = logaddexp(logit_y, lse_o), so both
terms are exact at any margin, in fp32 and in bf16 (chunks are upcast to fp32).

Three backends compute the same numbers:
- "eager": chunked torch ops, no start-up cost; the CPU's.
- "compiled": the same maths written as two pure functions for torch.compile, which
  fuses the row gather, the target exclusion and the reduction into one pass and the
  backward into another; it costs a one-off compilation.
- "triton": hand-written Triton kernels (core.fused_kernels), one pass over the logits
  each way, no host sync; CATNIP's whole loss is three kernels; CUDA only.
"auto" (the default) is triton for CUDA logits where Triton is installed (a version
the kernels have run on, TRITON_VERIFIED or newer), eager otherwise. `set_backend` picks
one per process (the worker reads LOSS_BACKEND).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Literal, get_args

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Backend = Literal["auto", "eager", "compiled", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_backend: Backend = "auto"


# The oldest Triton the kernels have run on (pytest -m gpu on an H100, torch 2.11). The
# auto backend uses them from this version on and stays eager below it (an older image's
# Triton may not compile them, and every job would fail); LOSS_BACKEND=triton forces them.
TRITON_VERIFIED = (3, 6)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_verified() -> bool:
    """Triton is installed and at least TRITON_VERIFIED."""
    if not triton_installed():
        return False
    import triton

    return _version_tuple(triton.__version__) >= TRITON_VERIFIED


def _version_tuple(version: str) -> tuple[int, ...]:
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
    """Choose how token_logprobs runs in this process: auto, eager, compiled or triton.
    ValueError names the valid ones, or says that Triton is not installed."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown loss backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "triton" and not triton_installed():
        raise ValueError("the triton loss backend needs the triton package (it comes with "
                         "CUDA builds of torch); use auto, eager or compiled")
    _backend = name


def check_device(device: torch.device) -> None:
    """ValueError if this process's backend cannot run on `device` (triton off CUDA)."""
    if _backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton loss backend runs on CUDA tensors, not {device.type}")


def _fused(logits: torch.Tensor) -> bool:
    """Whether token_logprobs and catnip_loss run on the Triton kernels for these logits."""
    if logits.dtype == torch.float64:  # the kernels accumulate in float32
        return False
    if _backend == "auto":
        return logits.device.type == "cuda" and triton_verified()
    check_device(logits.device)
    return _backend == "triton"

# Elements processed at once inside token_logprobs, per device type; the fp32 scratch
# memory is one chunk (elements * 4 bytes) whatever the batch size.
# - CPU: 2 MiB. The chunk stays in cache and no large temporary is allocated, so none
#   is page-faulted in. Measured on 2 cores, fp32 [2, 256, 32000]: the forward went from
#   78 ms with 64 MiB chunks to 19 ms, the backward from 117 ms to 47 ms. 8 to 32 rows
#   per chunk were within 15% of that; 4 rows made the forward 1.45x slower, 131 rows
#   (8 MiB) both 1.5-1.7x slower.
# - Accelerators: 64 MiB, big enough that kernel launches do not dominate (measured on an
#   H100: 128-row chunks made the loss 9x slower than cross-entropy on [2, 256, 32000]).
CHUNK_ELEMENTS = {"cpu": 1 << 19, "default": 1 << 24}


def _row_chunk(logits: torch.Tensor) -> int:
    elements = CHUNK_ELEMENTS.get(logits.device.type, CHUNK_ELEMENTS["default"])
    return max(1, elements // logits.shape[1])


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype the row maths runs in: float64 for float64 logits, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_grad(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of a backward that writes only `rows`: zeroed unless every
    row gets written."""
    return torch.empty_like(logits) if rows.shape[0] == logits.shape[0] else torch.zeros_like(logits)


def _counted_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T], rows [N]): which positions count, and their flat indices."""
    mask = labels != IGNORE_INDEX
    return mask, mask.reshape(-1).nonzero().squeeze(1)


def _unflatten_rows(values: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row values [N] back to [B, T], 0 where a position does not count."""
    return values.new_zeros(mask.numel()).index_put((rows,), values).view(mask.shape)


def _chunked_forward(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
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


# The eager backward writes every row straight into the gradient when at least this
# fraction of the rows count (raw text: all but the last position and the padding), and
# gathers the counted rows otherwise (QA: the prompts do not count). Measured on CPU,
# [1024, 32000] fp32, dense time / gathered time in two runs (the dense way computes the
# rows that do not count too): 0.81 and 0.63 with 99.6% of the rows counted, 0.91 and
# 0.67 at 95%, 0.93 and 0.71 at 90%, 1.14 and 0.84 at 80%, 1.54 and 1.38 at 50%.
DENSE_MIN_FRACTION = 0.9


def _chunked_backward(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                      lse: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
    """Eager backward: g * (onehot(y) - softmax) on the selected rows, 0 elsewhere.
    `rows` are distinct and increasing (token_logprobs passes nonzero())."""
    if logits.dtype == grad_logp.dtype and rows.shape[0] >= DENSE_MIN_FRACTION * logits.shape[0]:
        return _dense_backward(logits, rows, targets, lse, grad_logp)
    return _gathered_backward(logits, rows, targets, lse, grad_logp)


def _dense_backward(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                    lse: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
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


def _gathered_backward(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                       lse: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
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


def _rows_forward(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
    """_chunked_forward's maths on whole rows, functional (for torch.compile, which fuses
    the gather, the target exclusion and the reduction, so nothing [N, V] is kept)."""
    x = logits.index_select(0, rows).to(_acc_dtype(logits))
    is_target = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    logit_y = x.gather(1, targets[:, None]).squeeze(1)
    lse_others = torch.logsumexp(torch.where(is_target, float("-inf"), x), dim=1)
    lse = torch.logaddexp(logit_y, lse_others)
    return logit_y - lse, lse_others - lse, lse


def _rows_backward(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                   lse: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
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
    return (torch.compile(_rows_forward, dynamic=True),
            torch.compile(_rows_backward, dynamic=True))


def _kernels() -> tuple:
    """(forward, backward) of the process's backend (eager or compiled)."""
    return _compiled() if _backend == "compiled" else (_chunked_forward, _chunked_backward)


class _TokenLogProbs(torch.autograd.Function):
    """log z and detached log(1 - z) for the target token of selected rows.

    forward(logits [R, V], rows [N], targets [N]) -> (logp [N], log1m [N]), float32.
    backward: d logp / d logits[row] = onehot(y) - softmax(logits[row]); other rows get
    0 and log1m has no gradient. Only `logits` (the caller's tensor) and three [N]
    vectors are saved, not a copy of the logits. The backward runs on the backend the
    forward ran on.
    """

    @staticmethod
    def forward(ctx, logits, rows, targets):  # type: ignore[override]
        forward, ctx.backward_kernel = _kernels()
        logp, log1m, lse = forward(logits, rows, targets)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.mark_non_differentiable(log1m)
        return logp, log1m

    @staticmethod
    def backward(ctx, grad_logp, _grad_log1m):  # type: ignore[override]
        logits, rows, targets, lse = ctx.saved_tensors
        return ctx.backward_kernel(logits, rows, targets, lse, grad_logp.to(lse.dtype)), None, None


class _FusedTokenLogProbs(torch.autograd.Function):
    """_TokenLogProbs on the Triton kernels, over every row: forward(logits [R, V],
    labels [R]) -> (logp [R], log1m [R]), float32, 0 where the label is IGNORE_INDEX.
    Saves `logits` (the caller's tensor), the labels and lse [R]."""

    @staticmethod
    def forward(ctx, logits, labels):  # type: ignore[override]
        from core import fused_kernels

        logp, log1m, lse = fused_kernels.forward(logits, labels, IGNORE_INDEX)
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(log1m)
        return logp, log1m

    @staticmethod
    def backward(ctx, grad_logp, _grad_log1m):  # type: ignore[override]
        from core import fused_kernels

        logits, labels, lse = ctx.saved_tensors
        return fused_kernels.backward(logits, labels, lse, grad_logp.float(), IGNORE_INDEX), None


class _FusedCatnip(torch.autograd.Function):
    """catnip_loss on the Triton kernels: forward(logits [R, V], labels [B, T] with
    B * T = R, token_stride, beta) -> the scalar loss. Two kernels: one program per row
    for softplus(u) and d loss / d log z, then one program for the per-sample mean (it
    writes the loss and each row's weighted derivative), so the backward is one kernel."""

    @staticmethod
    def forward(ctx, logits, labels, token_stride, beta):  # type: ignore[override]
        from core import fused_kernels

        loss, dlogp, lse = fused_kernels.catnip_forward(logits, labels, beta, token_stride, IGNORE_INDEX)
        ctx.save_for_backward(logits, labels, lse, dlogp)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        from core import fused_kernels

        logits, labels, lse, dlogp = ctx.saved_tensors
        grad = fused_kernels.backward(logits, labels.view(-1), lse, dlogp, IGNORE_INDEX, scale=grad_loss)
        return grad, None, None, None


def _flat_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] as [R, V] with a contiguous last dimension (a view where it can)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log z and detached log(1 - z).

    Args:
        logits: [B, T, V] (any float dtype).
        labels: [B, T] aligned with logits; IGNORE_INDEX where a position does not count.
    Returns:
        (logp, log1m): [B, T] in float32 (float64 for float64 logits); 0 where a
        position does not count.
    """
    _check_shapes(logits, labels)
    if _fused(logits):  # every row, no gather of the counted ones (no host sync)
        logp, log1m = _FusedTokenLogProbs.apply(_flat_rows(logits), labels.reshape(-1).contiguous())
        return logp.view(labels.shape), log1m.view(labels.shape)
    mask, rows = _counted_rows(labels)
    targets = labels.reshape(-1).index_select(0, rows)
    logp_rows, log1m_rows = _TokenLogProbs.apply(logits.reshape(-1, logits.shape[-1]), rows, targets)
    return _unflatten_rows(logp_rows, rows, mask), _unflatten_rows(log1m_rows, rows, mask)


def _check_stride(token_stride: int) -> None:
    if token_stride < 1:
        raise ValueError(f"token_stride must be >= 1, got {token_stride}")


def strided_mask(labels: torch.Tensor, token_stride: int = 1) -> torch.Tensor:
    """Which positions count: [B, T] bool.

    Of each sample's counted positions, in order, those whose index (0, 1, 2, ...)
    is a multiple of `token_stride` (paper A.4: stride 16 on WMDP).
    """
    _check_stride(token_stride)
    mask = labels != IGNORE_INDEX
    if token_stride == 1:
        return mask
    rank = mask.long().cumsum(dim=1) - 1  # index among the sample's counted positions
    return mask & (rank % token_stride == 0)


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's counted positions, then over samples that have any.

    values, mask: [B, T]. Samples with no counted position do not count; a batch with
    none at all gives 0 (still attached to the graph, so backward works).
    """
    return (values * _token_weights(mask, torch.promote_types(values.dtype, torch.float32))).sum()


def _token_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] in `dtype`: 1 / (the sample's count x the number of samples with a count) on
    counted positions, else 0, so that sum(values * weights) is _per_sample_mean. Built
    from the mask alone (no gradient), it leaves two recorded ops for autograd where the
    mean written out leaves seven (on a GPU, at training sizes, the loss is launch-bound)."""
    counts = mask.sum(dim=1, keepdim=True, dtype=dtype)  # [B, 1]
    samples = (counts > 0).sum().clamp(min=1)
    return mask / (counts.clamp(min=1) * samples)


def _sequence_sums(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over counted positions [B], count [B]) for sequence-level losses."""
    return (values * mask).sum(dim=1), mask.sum(dim=1)


def _mean_over_samples(per_sample: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of per_sample [B] over the samples whose count is > 0; 0 (attached to the
    graph) if none. No host sync (a GPU keeps its queue of work)."""
    has_tokens = (counts > 0).to(per_sample.dtype)
    return (per_sample * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def catnip_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1.0,
    token_stride: int = 1,
) -> torch.Tensor:
    """CATNIP, paper eq. 8: calibrated, tokenized negative preference alignment.

        L = E_(x,y) [ 1/|y| * sum_i -log(1 - sigmoid(beta * (log z_i - log(1 - sg(z_i))))) ]
          = E_(x,y) [ 1/|y| * sum_i softplus(beta * (log z_i - sg(log(1 - z_i)))) ]

    with z_i = pi_theta(y_i | x, y_<i). Its gradient (eq. 9) per token is
        beta * z^beta / (z^beta + (1 - z)^beta) * grad log z_i,
    so confident tokens are pushed hardest. Symbols -> arguments: beta -> `beta`;
    the response tokens y_i are the positions where `labels` != -100, subsampled by
    `token_stride` (A.4); |y| is the number of positions that count.

    Args:
        logits: [B, T, V] policy logits.
        labels: [B, T] targets aligned with logits, -100 where a position does not count.
    Returns:
        scalar: per-sample mean over counted tokens, then mean over samples that have any.
    On the triton backend the whole loss is three kernels (core.fused_kernels); elsewhere
    it is token_logprobs, then catnip_from_logprobs.
    """
    _check_shapes(logits, labels)
    _check_stride(token_stride)
    if _fused(logits):  # the whole loss on three kernels (rows, per-sample mean, backward)
        return _FusedCatnip.apply(_flat_rows(logits), labels.contiguous(), token_stride, beta)
    logp, log1m = token_logprobs(logits, labels)
    return catnip_from_logprobs(logp, log1m, strided_mask(labels, token_stride), beta)


def catnip_from_logprobs(
    logp: torch.Tensor, log1m: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Eq. 8 on precomputed [B, T] log z (with grad) and log(1 - z) (detached)."""
    u = beta * (logp - log1m.detach())
    return _per_sample_mean(F.softplus(u), mask)


def catnip_ref_from_logprobs(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """CATNIP_ref (Table 3): eq. 8 with the frozen initial model as the reference.

        L = E [ 1/|y| * sum_i softplus(beta * (log z_i - log pi_ref(y_i | x, y_<i))) ]
    ref_logp: [B, T] from the reference model, detached.
    """
    u = beta * (logp - ref_logp.detach())
    return _per_sample_mean(F.softplus(u), mask)


def catnip_seq_from_logprobs(
    logp: torch.Tensor, log1m: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """CATNIP w/o CAT (Table 3): sequence level, beta/|y| inside the sigmoid.

        L = E [ softplus(beta/|y| * sum_i (log z_i - sg(log(1 - z_i)))) ]
    """
    sums, counts = _sequence_sums(logp - log1m.detach(), mask)
    u = beta * sums / counts.clamp(min=1)
    return _mean_over_samples(F.softplus(u), counts)


def ga_from_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient ascent (5.1.3): minimise the mean token log-likelihood of the forget set.

        L = E [ 1/|y| * sum_i log z_i ]
    """
    return _per_sample_mean(logp, mask)


def npo_from_logprobs(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """NPO, paper eq. 4 (Zhang et al., 2024): frozen reference, sequence log-probs.

        L = E [ -(2/beta) * log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x))) ]
    """
    seq, counts = _sequence_sums(logp - ref_logp.detach(), mask)
    per_sample = -(2.0 / beta) * F.logsigmoid(-beta * seq)
    return _mean_over_samples(per_sample, counts)


def simnpo_from_logprobs(
    logp: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimNPO (Fan et al., 2025; paper 3.3): length-normalised, margin gamma, no reference.

        L = E [ -(2/beta) * log sigmoid(-(beta/|y|) * log pi_theta(y|x) - gamma) ]
    """
    seq, counts = _sequence_sums(logp, mask)
    per_sample = -(2.0 / beta) * F.logsigmoid(-(beta / counts.clamp(min=1)) * seq - gamma)
    return _mean_over_samples(per_sample, counts)


def nll_from_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain NLL: E [ -1/|y| * sum_i log pi_theta(y_i | ...) ] on retain data."""
    return -_per_sample_mean(logp, mask)


class _RetainKL(torch.autograd.Function):
    """KL[q || r] of selected rows, q = softmax(logits), r = softmax(ref_logits).

    forward(logits [R, V], ref_logits [R, V], rows [N]) -> kl [N] in the accumulation
    dtype (float32; float64 for float64 logits), computed chunk by chunk.
    backward: d kl / d logits[row] = q * (log q - log r - kl); other rows get 0 and the
    reference gets nothing. Only the two logits tensors, rows and kl are saved (nothing
    [N, V] of its own): the backward recomputes both log-softmaxes per chunk.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, rows):  # type: ignore[override]
        acc = _acc_dtype(logits)
        kl = torch.empty(rows.shape[0], dtype=acc, device=logits.device)
        step = _row_chunk(logits)
        for start in range(0, rows.shape[0], step):
            part = rows[start:start + step]
            logq = F.log_softmax(logits.index_select(0, part).to(acc), dim=1)  # [n, V]
            diff = F.log_softmax(ref_logits.index_select(0, part).to(acc), dim=1)
            diff.neg_().add_(logq)  # log q - log r
            kl[start:start + step] = logq.exp_().mul_(diff).sum(dim=1)
        ctx.save_for_backward(logits, ref_logits, rows, kl)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        logits, ref_logits, rows, kl = ctx.saved_tensors
        grad_kl = grad_kl.to(kl.dtype)
        grad = _row_grad(logits, rows)
        step = _row_chunk(logits)
        for start in range(0, rows.shape[0], step):
            part = rows[start:start + step]
            logq = F.log_softmax(logits.index_select(0, part).to(kl.dtype), dim=1)
            diff = F.log_softmax(ref_logits.index_select(0, part).to(kl.dtype), dim=1)
            diff.neg_().add_(logq).sub_(kl[start:start + step].unsqueeze(1))  # log q - log r - kl
            chunk = logq.exp_().mul_(diff).mul_(grad_kl[start:start + step].unsqueeze(1))
            grad.index_copy_(0, part, chunk.to(grad.dtype))
        return grad, None, None


class _FusedRetainKL(torch.autograd.Function):
    """kl_retain_loss on the Triton kernels: forward(logits [R, V], ref_logits [R, V],
    labels [B, T] with B * T = R) -> the scalar loss. One program per row for its KL and
    log-sum-exps, then CATNIP's per-sample-mean program (with a token stride of 1) for
    the loss and each row's weight; the backward is one kernel."""

    @staticmethod
    def forward(ctx, logits, ref_logits, labels):  # type: ignore[override]
        from core import fused_kernels

        loss, out = fused_kernels.retain_kl_forward(logits, ref_logits, labels, IGNORE_INDEX)
        ctx.save_for_backward(logits, ref_logits, labels, out)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        from core import fused_kernels

        logits, ref_logits, labels, out = ctx.saved_tensors
        grad = fused_kernels.retain_kl_backward(logits, ref_logits, labels.view(-1), out, grad_loss, IGNORE_INDEX)
        return grad, None, None


def kl_retain_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Retain KL, paper eq. 1: KL[pi_theta(.|x) || pi_ref(.|x)] at counted positions.

    logits, ref_logits: [B, T, V]; labels: [B, T] (only the mask is used).
    Full-vocabulary KL per counted position (computed in chunks, so the scratch memory
    is one fp32 chunk, not several [B, T, V] tensors), per-sample mean, then mean over
    samples. On the triton backend: core.fused_kernels' KL kernels.
    """
    if logits.shape != ref_logits.shape or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, ref_logits {tuple(ref_logits.shape)} "
                         f"and labels {tuple(labels.shape)} disagree")
    if _fused(logits):  # three kernels, as catnip_loss
        return _FusedRetainKL.apply(_flat_rows(logits), _flat_rows(ref_logits.detach()), labels.contiguous())
    mask, rows = _counted_rows(labels)
    vocab = logits.shape[-1]
    kl_rows = _RetainKL.apply(logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab), rows)
    return _per_sample_mean(_unflatten_rows(kl_rows, rows, mask), mask)
