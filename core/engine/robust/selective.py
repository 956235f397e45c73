"""Selective updates: the forget gradient keeps what is specific to the forget set.

Two rules, applied to the forget term's gradient alone (the retain term's is added after):

- project (CIR, arXiv 2509.11816; RepSelect): a linear layer's weight gradient is a sum
  of outer products, G = sum_t delta_t x_t^T (G [out, in], x_t the layer's input at token
  t). The directions of input space that retain data also uses are the top-k right
  singular vectors U [in, k] of the retain inputs X [N, in] (uncentred: the mean direction,
  which every input shares, counts as one). G <- G (I - U U^T) removes exactly that
  subspace from every x_t's contribution and leaves its orthogonal complement unchanged.
  A LoRA adapter's A and B are linear layers too: each is projected on its own inputs.
  Weights that are not of a linear layer (embeddings, norms, biases) are left as they are.
- mask (MUDMAN, arXiv 2506.12484, "disruption masking"): keep coordinate i of the forget
  gradient g_f only where sign(g_f[i]) == sign(g_r[i]), g_r the retain NLL gradient at the
  same weights; both are gradients of losses the step descends, so every kept coordinate
  lowers the retain loss to first order too. A zero in either drops the coordinate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

# --- the two rules on tensors ----------------------------------------------------


def principal_basis(rows: torch.Tensor, components: int) -> torch.Tensor:
    """The top `components` right singular vectors of rows [N, d], as orthonormal
    columns [d, k] (k = min(components, N, d)), in fp32."""
    _, _, vh = torch.linalg.svd(rows.float(), full_matrices=False)
    return vh[: min(components, vh.shape[0])].T.contiguous()


def project_off(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """grad [out, in] with its rows taken off the column space of basis [in, k]:
    grad - (grad U) U^T, in grad's dtype."""
    g = grad.float()
    return (g - (g @ basis) @ basis.T).to(grad.dtype)


def sign_agreement(forget_grad: torch.Tensor, retain_grad: torch.Tensor) -> torch.Tensor:
    """forget_grad where its sign equals retain_grad's, 0 elsewhere (same shape)."""
    keep = torch.sign(forget_grad) == torch.sign(retain_grad)
    return forget_grad * keep


# --- the layers' inputs on retain data ---------------------------------------------


def linear_modules(
    model: torch.nn.Module, named: dict[str, torch.nn.Parameter]
) -> dict[str, torch.nn.Linear]:
    """parameter name -> its nn.Linear, for every trained 2-D weight of a linear layer."""
    modules = dict(model.named_modules())
    found = {}
    for name, param in named.items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf == "weight" and param.dim() == 2 and isinstance(module, torch.nn.Linear):
            found[name] = module
    return found


@contextlib.contextmanager
def captured_inputs(
    layers: dict[str, torch.nn.Linear], mask: Callable[[], torch.Tensor], max_rows: int
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While open, each layer's inputs at real tokens (mask() [B, T] is 1 there) are kept,
    as rows [n, in] on the layer's device, up to max_rows per layer."""
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name: str) -> Callable[..., None]:
        def keep(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            have = sum(len(rows) for rows in kept[name])
            if have >= max_rows:
                return
            x = args[0].detach()
            rows = x[mask().to(x.device).bool()] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            kept[name].append(rows[: max_rows - have])

        return keep

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def project_gradients(
    named: dict[str, torch.nn.Parameter],
    inputs: dict[str, list[torch.Tensor]],
    components: int,
) -> None:
    """Each weight's .grad projected off its retain inputs' top principal directions."""
    for name, rows in inputs.items():
        grad = named[name].grad
        if grad is None or not rows:
            continue
        basis = principal_basis(torch.cat(rows), components).to(grad.device)
        named[name].grad = project_off(grad, basis)


def mask_gradients(
    named: dict[str, torch.nn.Parameter], retain_grads: dict[str, torch.Tensor | None]
) -> None:
    """Each .grad kept only where it agrees in sign with the retain gradient (a weight the
    retain loss does not reach has no agreeing coordinate: its forget gradient is 0)."""
    for name, param in named.items():
        if param.grad is None:
            continue
        retain = retain_grads.get(name)
        param.grad = (
            torch.zeros_like(param.grad) if retain is None else sign_agreement(param.grad, retain)
        )
