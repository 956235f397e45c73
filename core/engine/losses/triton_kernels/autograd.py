"""The autograd functions over the kernels and the three losses the backend calls."""

from __future__ import annotations

from typing import Any

import torch

from core.engine.losses.backend import IGNORE_INDEX
from core.engine.losses.triton_kernels.ops import (
    backward,
    catnip_forward,
    forward,
    retain_kl_backward,
    retain_kl_forward,
)


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
