"""The hyperparameters of each method: typed, bounded, with the paper's defaults
(appendix A.4.4, the QA forget set, unless noted). Pure pydantic: the API validates a
job's hyperparameters with them without loading torch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.engine.spec.robust import AttackLoopParams, SelectiveParams

# The most optimizer steps a job may run, whether it asks by max_steps or by epochs.
MAX_STEPS = 1_000_000


class TrainingParams(BaseModel):
    """Hyperparameters every method shares. Exactly one of max_steps / epochs drives length.
    Every number is finite and bounded (a job is a promise of work)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(1e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Optimizer steps; overrides epochs when set."
    )
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the forget set.")
    batch_size: int = Field(4, ge=1, le=1024, description="Forget samples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_length: int = Field(
        512, ge=8, le=32768, description="Tokens per sample; raw text is cut into windows of it."
    )
    warmup_steps: int = Field(
        0, ge=0, le=MAX_STEPS, description="Linear warmup from 0 to the peak rate."
    )
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="Clip; null disables.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Save a resumable checkpoint every N steps (and at the end).",
    )
    retain_loss: Literal["none", "nll", "kl"] = Field(
        "none", description="Optional retain term on retain data: NLL, or KL to the reference."
    )
    retain_weight: float = Field(1.0, ge=0, le=1000, description="Weight of the retain term.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward instead of keeping "
        "them: less memory for long sequences and big models, at the cost of about one more "
        "forward per step. Same result.",
    )
    master_weights: bool = Field(
        True,
        description="Keep fp32 copies of trainable weights held in bf16/fp16 (full weights on "
        "a GPU) and let the optimizer update those: at the paper's learning rates most bf16 "
        "updates round away (docs/performance.md). Costs 12 bytes per such weight (copy + fp32 "
        "Adam state) instead of 4. LoRA adapters are fp32 already.",
    )
    sam_rho: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Sharpness-aware unlearning (Fan et al., 2025): the radius of the weight "
        "perturbation the forget loss is minimised against; each step then costs one more "
        "forward and backward of it. 0 = off.",
    )
    forget_eos: bool = Field(
        False,
        description="Count the end-of-sequence token after each forget response (QA/chat) as "
        "a forget target. Off by default: it carries none of the knowledge, every answer in "
        "every domain ends with it, and pushing it down teaches the model not to stop, "
        "which damages all answers (measured on the demo benchmark: docs/evaluation.md).",
    )
    selective: SelectiveParams | None = Field(
        None,
        description="Selective updates: the forget gradient projected off the retain data's "
        "principal directions (CIR) and/or masked by sign agreement with the retain "
        "gradient (MUDMAN). Needs a retain_file. Null: off.",
    )
    attack_in_loop: AttackLoopParams | None = Field(
        None,
        description="Every K steps, the forget gradient is taken after a simulated relearning "
        "step on a split of the forget set (first-order meta-unlearning). Null: off.",
    )

    @model_validator(mode="after")
    def _one_gradient_rule(self) -> TrainingParams:
        if self.sam_rho > 0 and (self.selective is not None or self.attack_in_loop is not None):
            raise ValueError(
                "sam_rho > 0 does not combine with selective or attack_in_loop: choose one "
                "rule for the forget gradient"
            )
        return self


class CatnipParams(TrainingParams):
    """CATNIP (eq. 8). Defaults: A.4.4 (Harry Potter QA): lr 1e-5, beta 1, 10 epochs."""

    learning_rate: float = Field(1e-5, gt=0, le=1)
    epochs: float = Field(10.0, gt=0, le=1000)
    beta: float = Field(1.0, gt=0, le=100, description="Inverse temperature of eq. 8.")
    token_stride: int = Field(
        1, ge=1, le=4096, description="Count every k-th response token (A.4: 16 on WMDP)."
    )


class GAParams(TrainingParams):
    """Gradient ascent. A.4.4: lr 3e-5, 3 epochs."""

    learning_rate: float = Field(3e-5, gt=0, le=1)
    epochs: float = Field(3.0, gt=0, le=1000)


class NPOParams(TrainingParams):
    """NPO (eq. 4). A.4.4: lr 5e-6, beta 0.05, 5 epochs."""

    learning_rate: float = Field(5e-6, gt=0, le=1)
    epochs: float = Field(5.0, gt=0, le=1000)
    beta: float = Field(0.05, gt=0, le=100)


class SimNPOParams(TrainingParams):
    """SimNPO. A.4.4: lr 5e-6, beta 4, gamma 0, 20 epochs."""

    learning_rate: float = Field(5e-6, gt=0, le=1)
    epochs: float = Field(20.0, gt=0, le=1000)
    beta: float = Field(4.0, gt=0, le=100)
    gamma: float = Field(0.0, ge=0, le=100, description="Margin of the SimNPO objective.")


class FLATParams(TrainingParams):
    """FLAT, Total Variation (Wang et al., 2025). A.4.4: lr 1e-5, 10 epochs. The expected
    responses come from the job's contrast_file, else from built-in refusals."""

    learning_rate: float = Field(1e-5, gt=0, le=1)
    epochs: float = Field(10.0, gt=0, le=1000)


LayerList = Annotated[
    list[Annotated[int, Field(ge=0, le=100_000)]], Field(min_length=1, max_length=1024)
]
ModuleList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=200)]], Field(min_length=1, max_length=64)
]


class RMUStarParams(TrainingParams):
    """RMU* (paper Table 1): RMU's forget term alone, on forget data only. Defaults: the
    official RMU implementation (WMDP, rmu/unlearn.py) and A.4.1: lr 5e-5, one epoch,
    batches of 4, no gradient clipping."""

    learning_rate: float = Field(5e-5, gt=0, le=1)
    epochs: float = Field(1.0, gt=0, le=1000)
    max_grad_norm: float | None = Field(None, gt=0, le=1e6, description="Clip; null disables.")
    layer: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Decoder layer whose output is steered. Official: 7 (of Zephyr-7B's 32); "
        "null: the same relative depth, round(7/32 x layers).",
    )
    update_layers: LayerList | None = Field(
        None,
        description="Decoder layers that train. Official: 5, 6, 7; null: the steered layer "
        "and the two below it.",
    )
    update_modules: ModuleList | None = Field(
        None,
        description="Modules of each update layer that train (the LoRA weights on them with "
        "an adapter). Official: the MLP output projection (Zephyr's mlp.down_proj); null: "
        "that projection, found by name.",
    )
    steering_coeff: float = Field(
        20.0,
        gt=0,
        le=1e4,
        description="c: the norm of the random direction forget activations are pushed to. "
        "Official default 20; its published Zephyr-7B run used 6.5.",
    )


class RMUParams(RMUStarParams):
    """RMU (Li et al., 2024): RMUStar's forget term plus alpha x the retain term."""

    alpha: float = Field(
        100.0,
        gt=0,
        le=1e6,
        description="Weight of the retain term (retain hidden states kept at the frozen "
        "model's). Official default 100; its published Zephyr-7B run used 1200.",
    )
