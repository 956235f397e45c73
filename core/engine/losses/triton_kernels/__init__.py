"""Triton kernels for token_logprobs, CATNIP and the retain KL on a GPU (the "triton" backend).

The same maths as the eager backend (`logprobs`), one program per row of logits [R, V]
(`token_kernels`): the log-probabilities' forward and backward. A row whose label is the
ignore index gets logp = log1m = 0 and a zero gradient row without its logits being read,
so prompt and padding cost a write, not a pass. CATNIP itself has two forward kernels of
its own (`loss_kernels`): one program per row for softplus(u) and its derivative in log z
(eq. 8, 9), then one program for the per-sample mean with the token stride, which writes
the loss and each row's weighted derivative. The whole loss is then three kernels (the
backward is the per-token one); every launch after the first of its kind bypasses
Triton's Python launcher (`launch`). `ops` allocates and launches, `autograd` wraps them.

Why: on a GPU the eager backend is launch-bound at training sizes (about 40 kernels and
three host syncs per forward and backward), and torch.compile's regions cost as much
again in call overhead. The measured figures are in docs/performance.md.

Imported only when that backend runs: Triton is a CUDA-side dependency (it ships with
CUDA builds of torch, not with the CPU wheel). With TRITON_INTERPRET=1 the kernels run
on CPU tensors through Triton's interpreter, which is how they are checked without a GPU.
"""

from core.engine.losses.triton_kernels.autograd import catnip_loss, kl_retain_loss, token_logprobs
from core.engine.losses.triton_kernels.launch import _LAUNCHERS
from core.engine.losses.triton_kernels.loss_kernels import _catnip_rows_kernel
from core.engine.losses.triton_kernels.ops import (
    backward,
    catnip_forward,
    forward,
    retain_kl_backward,
    retain_kl_forward,
)

__all__ = [
    "_LAUNCHERS",  # the direct launches so far, and the kernel keyed on, for tests/test_gpu.py
    "_catnip_rows_kernel",
    "backward",
    "catnip_forward",
    "catnip_loss",
    "forward",
    "kl_retain_loss",
    "retain_kl_backward",
    "retain_kl_forward",
    "token_logprobs",
]
