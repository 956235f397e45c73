"""The options for robust and selective forgetting, torch-free, so the API
validates them without loading torch: selective updates and the attack in the loop (any
method's hyperparameters), and the distillation stage after unlearning (`robustify`, a
part of the job spec). What each does: docs/methods.md, "Robust and selective forgetting";
the code: core.engine.robust."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SelectiveParams(BaseModel):
    """Selective updates: the forget gradient loses what it shares with retain data.

    `project` (CIR, arXiv 2509.11816; RepSelect): for every trained linear weight
    W [out, in], the forget gradient G is taken off the top `components` principal
    directions U [in, k] of that layer's inputs on the step's retain batches:
    G <- G - G U U^T. `mask` (MUDMAN, arXiv 2506.12484): keep a coordinate of the forget
    gradient only where its sign agrees with the retain NLL gradient's there, so the
    step never raises the retain loss to first order on any coordinate. `both`: project,
    then mask. Needs a retain_file (in-domain neighbours belong there)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Literal["project", "mask", "both"] = Field(
        "project", description="project (CIR), mask (MUDMAN sign agreement) or both."
    )
    components: int = Field(
        8, ge=1, le=4096, description="k: principal directions of the retain inputs removed."
    )
    max_rows: int = Field(
        4096,
        ge=16,
        le=1_000_000,
        description="At most this many retain token positions per layer enter the subspace.",
    )


class AttackLoopParams(BaseModel):
    """Attack in the loop (first-order meta-unlearning; TAR, arXiv 2408.00761, for the
    full version): every `every` steps the weights take `steps` SGD steps of NLL on a
    fixed, seeded `split` of the forget set (a simulated relearning attack), the forget
    loss's gradient is taken there, and that gradient updates the original weights."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    every: int = Field(1, ge=1, le=1_000_000, description="Attack every K steps.")
    lr: float = Field(1e-4, gt=0, le=10, description="The simulated attacker's SGD rate.")
    steps: int = Field(1, ge=1, le=64, description="The attacker's SGD steps per attack.")
    split: float = Field(
        0.2, gt=0, le=1, description="Share of the forget set the attacker trains on."
    )


class RobustifySpec(BaseModel):
    """Distillation after unlearning (UNDO, arXiv 2506.06278): the unlearned model is the
    teacher; the student starts from its weights moved `alpha` toward a fresh
    initialisation seeded with `seed` (w <- (1 - alpha) w + alpha w_init) and is distilled
    from the teacher (forward KL over next-token distributions) on the job's
    `distill_file`. Teacher and student are both in memory; a LoRA job's output becomes
    full weights (the adapter is merged first)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float = Field(0.6, ge=0, le=1, description="Share of the way to the fresh init.")
    steps: int = Field(1000, ge=1, le=1_000_000, description="Distillation optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW rate of the student.")
    batch_size: int = Field(8, ge=1, le=1024)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="Clip; null disables.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the fresh init and the order.")
    probe_every: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="With eval forget_qa and retain_qa: probe every K steps and stop once "
        "the student's utility is within eval.utility_budget of the teacher's. Null: every "
        "~5% of the steps.",
    )
