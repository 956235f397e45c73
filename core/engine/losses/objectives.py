"""The unlearning objectives: CATNIP (paper eq. 8, arXiv:2602.02824), its ablations and
the baselines of 5.1.3. Read this file first; how the per-token log-probabilities are
computed (and on which backend) is `logprobs` and `triton_kernels`.

Every loss here is a pure tensor function. Shapes use
    B = batch, T = sequence positions, V = vocabulary.
`labels[b, t]` is the target of `logits[b, t]` (already shifted); -100 (IGNORE_INDEX)
marks a position that does not count (prompt, padding). The `*_from_logprobs` losses
take [B, T] tensors from `token_logprobs`: log z with its gradient, log(1 - z) detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.engine.losses.backend import IGNORE_INDEX, check_shapes, flat_rows, use_triton
from core.engine.losses.logprobs import retain_kl_rows, token_logprobs


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
    On the triton backend the whole loss is three kernels (triton_kernels); elsewhere
    it is token_logprobs, then catnip_from_logprobs.
    """
    check_shapes(logits, labels)
    _check_stride(token_stride)
    if use_triton(logits):  # the whole loss on three kernels (rows, per-sample mean, backward)
        from core.engine.losses import triton_kernels

        return triton_kernels.catnip_loss(flat_rows(logits), labels, beta, token_stride)
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
    length = counts.clamp(min=1).to(seq.dtype)  # in the log-probs' precision, not float32's
    per_sample = -(2.0 / beta) * F.logsigmoid(-(beta / length) * seq - gamma)
    return _mean_over_samples(per_sample, counts)


def flat_tv_from_logprobs(
    logp: torch.Tensor,
    mask: torch.Tensor,
    contrast_logp: torch.Tensor,
    contrast_mask: torch.Tensor,
) -> torch.Tensor:
    """FLAT (Wang et al., 2025, "LLM Unlearning via Loss Adjustment with Only Forget
    Data"), Total Variation, the setting the paper uses (5.1.3). FLAT minimises the
    variational (dual) form of an f-divergence between the expected (contrast) responses
    y_e and the forget responses y_f, with the average token probability
    P(y|x) = 1/|y| sum_i pi_theta(y_i | x, y_<i) as the variational function's input:

        L = -g*(P(y_e|x)) + f*(g*(P(y_f|x)))

    and for Total Variation g*(v) = f*(g*(v)) = tanh(v) / 2, so

        L = 1/2 tanh(P_f) - 1/2 tanh(P_e)

    with P_f, P_e the batch's mean (per sample, then over samples) of the forget and the
    contrast responses' token probabilities: it lowers the forget responses' probability
    and raises the expected ones'. The official code averages over every position of the
    padded batch, prompt and padding included (which scales both P by the share of
    response positions); here the mean is over response tokens, as the paper writes P.

    logp, contrast_logp: [B, T] log z with grad; mask, contrast_mask: [B, T] bool.
    """
    forget = _per_sample_mean(logp.exp(), mask)
    expected = _per_sample_mean(contrast_logp.exp(), contrast_mask)
    return 0.5 * torch.tanh(forget) - 0.5 * torch.tanh(expected)


def hidden_mse(
    hidden: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """RMU's distance (Li et al., 2024, WMDP, eq. 1-2): the mean over the batch's tokens
    of the mean squared difference over the hidden dimension,
        1/|tokens| * sum_t 1/H * || h_t - target_t ||^2,
    in float32 whatever the hidden states' dtype.

    hidden: [B, T, H] with grad; target: [B, T, H] or [H] (broadcast: RMU's c * u);
    attention_mask: [B, T], 1 where a token is real (padding does not count; the
    official code pads and counts the padding, which a batch of equal lengths shares).
    """
    diff = hidden.float() - target.detach().float()
    per_token = diff.pow(2).mean(dim=-1)  # [B, T]
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def nll_from_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain NLL: E [ -1/|y| * sum_i log pi_theta(y_i | ...) ] on retain data."""
    return -_per_sample_mean(logp, mask)


def kl_retain_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Retain KL, paper eq. 1: KL[pi_theta(.|x) || pi_ref(.|x)] at counted positions.

    logits, ref_logits: [B, T, V]; labels: [B, T] (only the mask is used).
    Full-vocabulary KL per counted position (computed in chunks, so the scratch memory
    is one fp32 chunk, not several [B, T, V] tensors), per-sample mean, then mean over
    samples. On the triton backend: three kernels, as catnip_loss.
    """
    if logits.shape != ref_logits.shape or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, ref_logits {tuple(ref_logits.shape)} "
            f"and labels {tuple(labels.shape)} disagree"
        )
    if use_triton(logits):
        from core.engine.losses import triton_kernels

        return triton_kernels.kl_retain_loss(
            flat_rows(logits), flat_rows(ref_logits.detach()), labels
        )
    return _per_sample_mean(retain_kl_rows(logits, ref_logits, labels), labels != IGNORE_INDEX)


# --- masks and means ------------------------------------------------------------


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
