"""Unlearning losses: `objectives` holds the paper's (read it first); `logprobs` and
`triton_kernels` compute the per-token log-probabilities they are built on, and
`backend` chooses between them."""

from core.engine.losses.backend import (
    BACKENDS,
    IGNORE_INDEX,
    TRITON_VERIFIED,
    Backend,
    check_device,
    get_backend,
    get_cpu_threads,
    set_backend,
    set_cpu_threads,
    triton_installed,
    triton_verified,
    use_triton,
    version_tuple,
)
from core.engine.losses.logprobs import token_logprobs
from core.engine.losses.objectives import (
    catnip_from_logprobs,
    catnip_loss,
    catnip_ref_from_logprobs,
    catnip_seq_from_logprobs,
    flat_tv_from_logprobs,
    ga_from_logprobs,
    hidden_mse,
    kl_retain_loss,
    nll_from_logprobs,
    npo_from_logprobs,
    simnpo_from_logprobs,
    strided_mask,
)

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "TRITON_VERIFIED",
    "Backend",
    "catnip_from_logprobs",
    "catnip_loss",
    "catnip_ref_from_logprobs",
    "catnip_seq_from_logprobs",
    "check_device",
    "flat_tv_from_logprobs",
    "ga_from_logprobs",
    "get_backend",
    "get_cpu_threads",
    "hidden_mse",
    "kl_retain_loss",
    "nll_from_logprobs",
    "npo_from_logprobs",
    "set_backend",
    "set_cpu_threads",
    "simnpo_from_logprobs",
    "strided_mask",
    "token_logprobs",
    "triton_installed",
    "triton_verified",
    "use_triton",
    "version_tuple",
]
