"""The attack in the loop: first-order meta-unlearning against a relearning attack.

A relearning attack fine-tunes the unlearned weights theta on a few forget examples and
measures what comes back. Meta-unlearning minimises the forget loss where the attack
lands: min_theta l_f(theta'(theta)), theta' = theta - eta grad l_a(theta) (one SGD step of
the attacker's loss l_a, NLL on a split of the forget set; `steps` of them in general).
The first-order approximation (as in first-order MAML; TAR, arXiv 2408.00761, keeps the
second-order term and costs far more) drops d theta'/d theta = I - eta H_a and applies
grad l_f(theta') to theta itself. So an attack step costs the attacker's forward and
backward per SGD step, plus the forget loss's, at the relearned weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def relearned(
    named: dict[str, torch.nn.Parameter],
    attack_loss: Callable[[int], torch.Tensor],
    lr: float,
    steps: int,
) -> Iterator[None]:
    """Inside the block the trainable weights `named` are theta' = the weights after
    `steps` plain SGD steps (rate `lr`) on attack_loss(i) (i = 0..steps-1, a scalar);
    their .grad is left as it was. A backward inside the block accumulates the gradient
    at theta' into .grad. On exit the weights are theta again (restored from copies, exact
    in any dtype)."""
    params = list(named.values())
    saved = [p.detach().clone() for p in params]
    try:
        for attack_step in range(steps):
            grads = torch.autograd.grad(attack_loss(attack_step), params, allow_unused=True)
            with torch.no_grad():
                for param, grad in zip(params, grads, strict=True):
                    if grad is not None:
                        param.sub_((lr * grad.float()).to(param.dtype))
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved, strict=True):
                param.copy_(value)
