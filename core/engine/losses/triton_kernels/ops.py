"""The kernels' host side: each function allocates its outputs and launches its kernels
over rows of logits [R, V] (last dimension contiguous), float32 results."""

from __future__ import annotations

from typing import Any

import torch

from core.engine.losses.triton_kernels.launch import (
    _backward_config,
    _forward_config,
    _label_block,
    _launch,
)
from core.engine.losses.triton_kernels.loss_kernels import (
    _catnip_finish_kernel,
    _catnip_rows_kernel,
    _kl_backward_kernel,
    _kl_rows_kernel,
)
from core.engine.losses.triton_kernels.token_kernels import _backward_kernel, _forward_kernel


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
