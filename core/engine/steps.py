"""Methods whose loss is more than a function of one forward's logits: FLAT, which also
scores a contrast batch, and RMU, which reads the hidden states at one decoder layer (of
the model, and of the frozen model on retain data) and trains only chosen weights.

A method of this form gives `Method.step_loss(StepInputs, params) -> (loss, terms)` and,
where it needs one, `Method.setup(wrapped, params) -> state`, run once per model before
the optimizer exists (core.engine.spec.methods.prepare): RMU's restricts what trains and draws its direction.
The tensor maths is in core.engine.losses.objectives (flat_tv_from_logprobs, hidden_mse).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from core.engine import losses
from core.engine.modeling import Wrapped, decoder_layers
from core.errors import SpecError

if TYPE_CHECKING:
    from core.engine.spec.params import FLATParams, RMUParams

Batch = dict[str, torch.Tensor]


@dataclass
class StepInputs:
    """One micro-batch of each set the method uses, on the model's device."""

    wrapped: Wrapped
    forget: Batch
    retain: Batch | None = None
    contrast: Batch | None = None
    state: Any = None  # what the method's setup returned


def _forward_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, _ = losses.token_logprobs(logits, batch["labels"])
    return logp


# --- FLAT -------------------------------------------------------------------------


def flat_step(inputs: StepInputs, params: FLATParams) -> tuple[torch.Tensor, dict[str, float]]:
    """FLAT-TV on a forget batch and its contrast batch (the expected responses)."""
    if inputs.contrast is None:
        raise RuntimeError("flat needs a contrast batch")
    model = inputs.wrapped.model
    forget_mask = inputs.forget["labels"] != losses.IGNORE_INDEX
    contrast_mask = inputs.contrast["labels"] != losses.IGNORE_INDEX
    logp = _forward_logprobs(model, inputs.forget)
    contrast_logp = _forward_logprobs(model, inputs.contrast)
    loss = losses.flat_tv_from_logprobs(logp, forget_mask, contrast_logp, contrast_mask)
    with torch.no_grad():  # the two probabilities the loss moves apart, for the history
        terms = {
            "forget_prob": float(_mean_prob(logp, forget_mask)),
            "contrast_prob": float(_mean_prob(contrast_logp, contrast_mask)),
        }
    return loss, terms


def _mean_prob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * mask).sum() / mask.sum().clamp(min=1)


# --- RMU --------------------------------------------------------------------------

# The MLP's output projection in the decoder layers of common architectures: what the
# official RMU trains (its param_ids=6 is Zephyr's mlp.down_proj.weight).
MLP_OUTPUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "fc2", "mlp.dense_4h_to_h")
# The official layer, 7 of Zephyr-7B's 32; other depths use the same share of the stack.
OFFICIAL_LAYER, OFFICIAL_DEPTH = 7, 32


@dataclass
class RMUState:
    stack: torch.nn.ModuleList
    layer: int
    update_layers: list[int]
    modules: list[str]
    control: torch.Tensor  # [H]: c * u, u uniform in [0, 1)^H, normalised


def rmu_layers(params: RMUParams, n_layers: int) -> tuple[int, list[int]]:
    """(the steered layer, the layers that train): hyperparameters.layer, or the official
    layer's relative depth, round(7/32 * n_layers); update_layers, or the official three
    ending at the steered layer (5, 6, 7). SpecError when out of range."""
    layer = params.layer
    if layer is None:
        layer = min(n_layers - 1, round(OFFICIAL_LAYER / OFFICIAL_DEPTH * n_layers))
    elif layer >= n_layers:
        raise SpecError(
            f"hyperparameters.layer {layer} is out of range: the model has {n_layers} layers "
            f"(0-{n_layers - 1})",
            param="hyperparameters.layer",
        )
    update = params.update_layers
    if update is None:
        update = list(range(max(0, layer - 2), layer + 1))
    bad = [i for i in update if i >= n_layers]
    if bad:
        raise SpecError(
            f"hyperparameters.update_layers {bad} out of range: the model has {n_layers} layers",
            param="hyperparameters.update_layers",
        )
    if min(update) > layer:
        raise SpecError(
            f"hyperparameters.update_layers {update} are all after the steered layer {layer}: "
            "no update can move its hidden states",
            param="hyperparameters.update_layers",
        )
    return layer, sorted(set(update))


def rmu_setup(wrapped: Wrapped, params: RMUParams) -> RMUState:
    """Train only `update_modules` of `update_layers` (the LoRA weights on them, with an
    adapter), keep frozen copies of those layers as the reference (full weights; a LoRA
    model's reference is the model with its adapter off), draw the steering direction."""
    model = wrapped.model
    stack = wrapped.layer_stack or decoder_layers(model)
    layer, update = rmu_layers(params, len(stack))
    modules = params.update_modules or _mlp_output(stack[layer])
    model.requires_grad_(False)
    trained: list[str] = []
    for index in update:
        found = dict(stack[index].named_modules())
        for name in modules:
            if name not in found:
                raise SpecError(
                    f"hyperparameters.update_modules: layer {index} has no module {name!r}",
                    param="hyperparameters.update_modules",
                )
            for param_name, param in found[name].named_parameters():
                if wrapped.adapter.type == "lora" and "lora_" not in param_name:
                    continue  # the frozen base weight under the adapter
                param.requires_grad_(True)
                trained.append(f"{index}.{name}.{param_name}")
    if not trained:
        raise SpecError(
            f"hyperparameters.update_modules {modules}: no LoRA weight on them; add them to "
            "adapter.target_modules (or use the default all-linear) or use adapter type full",
            param="hyperparameters.update_modules",
        )
    if wrapped.adapter.type == "full" and getattr(params, "alpha", 0) > 0:
        # the frozen model differs from the trained one in the update layers alone
        wrapped.reference_layers = {
            i: copy.deepcopy(stack[i]).eval().requires_grad_(False) for i in update
        }
        wrapped.layer_stack = stack
    generator = torch.Generator().manual_seed(params.seed)
    hidden = model.config.hidden_size
    direction = torch.rand(hidden, generator=generator)
    device = next(model.parameters()).device
    control = (direction / direction.norm() * params.steering_coeff).to(device)
    return RMUState(stack, layer, update, list(modules), control)


def _mlp_output(layer: torch.nn.Module) -> list[str]:
    names = dict(layer.named_modules())
    for name in MLP_OUTPUT_NAMES:
        if name in names:
            return [name]
    raise SpecError(
        f"hyperparameters.update_modules: no MLP output projection found in "
        f"{type(layer).__name__} (looked for {', '.join(MLP_OUTPUT_NAMES)}); name the "
        "modules to train",
        param="hyperparameters.update_modules",
    )


class _Captured(Exception):
    """Raised once the steered layer has run: what comes after it is not needed."""


def hidden_states_at(
    model: Any, stack: torch.nn.ModuleList, index: int, batch: Batch
) -> torch.Tensor:
    """[B, T, H]: the output of decoder layer `index` of `stack` when `model` runs on
    `batch`. The forward stops right after it, at the next layer's input (or the
    vocabulary projection's, after the last layer): what is above it, often most of the
    cost, never runs. It stops outside the layer, so a layer under activation
    checkpointing has finished its forward and recomputes it in the backward as usual."""
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    def stop(_module: Any, _args: Any) -> None:
        raise _Captured

    handles = [stack[index].register_forward_hook(keep)]
    after = stack[index + 1] if index + 1 < len(stack) else model.get_output_embeddings()
    if after is not None:
        handles.append(after.register_forward_pre_hook(stop))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise RuntimeError(f"decoder layer {index} did not run in the forward")
    return captured[0]


def rmu_step(inputs: StepInputs, params: RMUParams) -> tuple[torch.Tensor, dict[str, float]]:
    """RMU (Li et al., 2024, eq. 1-2) with h = the steered layer's output:

        L = mean_t || h_theta(x_f)_t - c u ||^2 / H
            + alpha * mean_t || h_theta(x_r)_t - h_frozen(x_r)_t ||^2 / H

    on a forget batch x_f and a retain batch x_r; c = steering_coeff, u a fixed random
    unit vector. RMU* (rmu_star) is the first term alone."""
    state: RMUState = inputs.state
    wrapped = inputs.wrapped
    forget_hidden = hidden_states_at(wrapped.model, state.stack, state.layer, inputs.forget)
    forget = losses.hidden_mse(forget_hidden, state.control, inputs.forget["attention_mask"])
    terms = {"forget_mse": float(forget.detach())}
    alpha = getattr(params, "alpha", 0.0)
    if alpha == 0 or inputs.retain is None:
        return forget, terms
    with wrapped.reference_mode() as frozen:
        frozen_hidden = hidden_states_at(frozen, state.stack, state.layer, inputs.retain)
    retain_hidden = hidden_states_at(wrapped.model, state.stack, state.layer, inputs.retain)
    retain = losses.hidden_mse(retain_hidden, frozen_hidden, inputs.retain["attention_mask"])
    terms["retain_mse"] = float(retain.detach())
    return forget + alpha * retain, terms
