"""The typed pieces of a job spec that are not hyperparameters: the adapter and the
eval sets. Pure pydantic (no torch), so the API validates a job without loading torch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.engine.formats import Kind

# The file kinds (core.engine.formats) each slot of a job accepts.
TRAIN_FILE_KINDS: tuple[Kind, ...] = ("qa", "chat", "text")
EVAL_FILE_KINDS: dict[str, tuple[Kind, ...]] = {
    "forget_qa": ("qa",),
    "retain_qa": ("qa",),
    "neighbor_qa": ("qa",),
    "forget_text": ("text",),
    "retain_text": ("text",),
    "forget_mc": ("mc",),
    "general_mc": ("mc",),
    "holdout": ("qa", "chat", "text"),
}
EVAL_FILE_FIELDS = tuple(EVAL_FILE_KINDS)


ModuleNames = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=200)]], Field(min_length=1, max_length=256)
]
LayerIndices = Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(max_length=1024)]


class ResourcesSpec(BaseModel):
    """What a job runs on beyond its worker's one device."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="Devices one full-weight job is sharded over (FSDP2: weights, gradients "
        "and optimizer state split between them; each takes gradient_accumulation_steps / "
        "gpus of a step's micro-batches). On a CPU worker, that many processes.",
    )


class AdapterSpec(BaseModel):
    """What is trained: a LoRA adapter (default) or the full weights."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["lora", "full"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16, gt=0, le=4096, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: ModuleNames | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get LoRA; default: every linear projection."
    )
    layers: LayerIndices | None = Field(
        None, description="full only: train just these decoder layers (paper, WMDP); null = all."
    )
    merge: bool = Field(False, description="lora only: also write merged full weights.")
    quantize: Literal["nf4"] | None = Field(
        None,
        description="lora only: QLoRA, the base model loaded in 4-bit NF4 (bitsandbytes, "
        "CUDA only); the adapter is the same PEFT layout, for the unquantized base.",
    )

    @model_validator(mode="after")
    def _check(self) -> AdapterSpec:
        if self.layers is not None and self.type != "full":
            raise ValueError("'layers' applies only to adapter type 'full'")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError("'layers' must be non-negative layer indices")
        if self.layers == []:
            raise ValueError("'layers' is empty: name at least one layer, or null for all")
        if self.quantize is not None and self.type != "lora":
            raise ValueError("'quantize' applies only to adapter type 'lora' (QLoRA)")
        if self.quantize is not None and self.merge:
            raise ValueError(
                "'merge' with 'quantize': merging into 4-bit weights loses the "
                "adapter's precision; merge the adapter into the full base instead"
            )
        return self


RelearnData = Literal["qa", "text"]


class RelearnCell(BaseModel):
    """One setting of the relearning attack: a full-weight fine-tune of `steps` AdamW
    steps at `learning_rate` on the attack split of the forget questions (`qa`) or of
    eval.forget_text (`text`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1, le=1000)
    data: RelearnData = "qa"

    @property
    def name(self) -> str:
        return f"{self.data}, lr {self.learning_rate:g}, {self.steps} steps"


def _qa_and_text() -> list[RelearnData]:
    return ["qa", "text"]


class RelearnGrid(BaseModel):
    """A sweep: every learning rate x steps x data."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    learning_rates: list[Annotated[float, Field(gt=0, le=1)]] = Field(min_length=1, max_length=12)
    steps: list[Annotated[int, Field(ge=1, le=1000)]] = Field(min_length=1, max_length=6)
    data: list[RelearnData] = Field(default_factory=_qa_and_text, min_length=1)

    def cells(self) -> list[RelearnCell]:
        return [
            RelearnCell(learning_rate=lr, steps=steps, data=data)
            for data in dict.fromkeys(self.data)
            for lr in self.learning_rates
            for steps in sorted(set(self.steps))
        ]


RELEARN_PRESETS: dict[str, RelearnGrid] = {
    "quick": RelearnGrid(learning_rates=[1e-5, 1e-3], steps=[20], data=["qa"]),
    "standard": RelearnGrid(learning_rates=[1e-5, 1e-4, 1e-3], steps=[20, 60]),
    "full": RelearnGrid(
        learning_rates=[1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], steps=[20, 60, 200]
    ),
}


class RelearnSpec(BaseModel):
    """The relearning attack: full-weight fine-tunes on an attack split of the forget
    questions (and of eval.forget_text), one per cell of a sweep; recovery is the worst
    cell's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool | None = Field(None, description="null: on where eval.forget_qa allows it.")
    fraction: float = Field(
        0.2, ge=0.05, le=0.5, description="Share of the forget questions it trains on."
    )
    preset: Literal["quick", "standard", "full"] = Field(
        "standard",
        description="The sweep: quick (lr 1e-5, 1e-3; 20 steps; QA), standard (lr 1e-5, "
        "1e-4, 1e-3; 20 and 60 steps; QA and text), full (lr 1e-6 to 3e-3; 20, 60, 200 "
        "steps; QA and text).",
    )
    grid: RelearnGrid | None = Field(None, description="A sweep of its own, instead of preset.")
    cells: list[RelearnCell] | None = Field(
        None, min_length=1, max_length=64, description="Cells of its own, instead of preset."
    )
    steps: int | None = Field(
        None, ge=1, le=1000, description="With or without learning_rate: one QA cell (20)."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="With or without steps: one QA cell (1e-4)."
    )
    batch_size: int = Field(8, ge=1, le=1024)

    @model_validator(mode="after")
    def _one_sweep(self) -> RelearnSpec:
        named = [
            name
            for name, given in (
                ("cells", self.cells is not None),
                ("grid", self.grid is not None),
                ("steps/learning_rate", self.steps is not None or self.learning_rate is not None),
            )
            if given
        ]
        if len(named) > 1:
            raise ValueError(f"name one of {' or '.join(named)}, not both")
        return self

    def sweep(self) -> list[RelearnCell]:
        """The cells this spec asks for, in the order they report."""
        if self.cells is not None:
            return list(self.cells)
        if self.grid is not None:
            return self.grid.cells()
        if self.steps is not None or self.learning_rate is not None:
            return [RelearnCell(learning_rate=self.learning_rate or 1e-4, steps=self.steps or 20)]
        return RELEARN_PRESETS[self.preset].cells()


def _eight_and_four() -> list[Literal[4, 8]]:
    return [8, 4]


class QuantizationSpec(BaseModel):
    """Weight-only round-to-nearest quantization (and NF4 where bitsandbytes and CUDA are)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool | None = Field(None, description="null: on where forget data allows it.")
    bits: list[Literal[4, 8]] = Field(default_factory=_eight_and_four, min_length=1, max_length=2)
    group_size: int = Field(128, ge=8, le=65536, description="Weights per quantization group.")
    nf4: bool | None = Field(None, description="null: where CUDA and bitsandbytes are present.")


class InContextSpec(BaseModel):
    """The forget questions asked with forget-set QA pairs as demonstrations."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool | None = Field(None, description="null: on where eval.forget_qa allows it.")
    shots: int = Field(3, ge=1, le=64)


class RobustnessSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    relearn: RelearnSpec = Field(default_factory=RelearnSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    in_context: InContextSpec = Field(default_factory=InContextSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the attack split and the attacks.")
    max_samples: int = Field(
        100,
        ge=5,
        le=100_000,
        description="Questions of each QA set the attacks use (the first ones).",
    )


class PrivacySpec(BaseModel):
    """Membership inference (Min-K%, Min-K%++) of the forget set against eval.holdout."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool | None = Field(None, description="null: on where eval.holdout is given.")
    k: float = Field(0.2, gt=0, le=1, description="Share of the lowest-scored tokens averaged.")
    max_samples: int = Field(500, ge=2, le=100_000)


class CriteriaSpec(BaseModel):
    """What must hold for the verdict to pass; each is optional."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    forget_knowmem_max_ratio: float | None = Field(
        None, ge=0, le=10, description="Forget score after at most this share of before."
    )
    utility_min_ratio: float | None = Field(
        None, ge=0, le=10, description="Utility score after at least this share of before."
    )
    relearn_recovery_max: float | None = Field(
        None, ge=-10, le=10, description="Relearning attack recovery at most this."
    )
    mia_auc_max_distance: float | None = Field(
        None, ge=0, le=0.5, description="Min-K%++ AUC after within this of 0.5."
    )
    quantized_forget_max_ratio: float | None = Field(
        None, ge=0, le=10, description="Forget KnowMem at 4 bits at most this share of before."
    )
    neighbor_min_ratio: float | None = Field(
        None,
        ge=0,
        le=10,
        description="Neighbour KnowMem (eval.neighbor_qa) after at least this share of before.",
    )


class EvalSpec(BaseModel):
    """Eval sets of a job (paths locally, file ids over the API) and their settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    forget_qa: str | None = Field(None, description="QA about what must be forgotten (KnowMem).")
    retain_qa: str | None = Field(None, description="QA about what must survive (utility KnowMem).")
    neighbor_qa: str | None = Field(
        None,
        description="QA about what sits next to the forget target (other entities of its "
        "domain) and must survive (neighbour KnowMem).",
    )
    forget_text: str | None = Field(None, description="Forget-domain text (VerbMem).")
    retain_text: str | None = Field(None, description="Retain text (perplexity).")
    forget_mc: str | None = Field(None, description="Forget-domain multiple choice (lm-eval).")
    general_mc: str | None = Field(None, description="General multiple choice (lm-eval).")
    holdout: str | None = Field(
        None,
        description="Records of the forget set's kind the model never saw (membership inference).",
    )
    reference_model: str | None = Field(
        None,
        description="A model trained without the forget set: its figures are reported beside the "
        "job's (a registered name over the API, a directory for `unlearn run`).",
    )
    robustness: RobustnessSpec = Field(default_factory=RobustnessSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    criteria: CriteriaSpec | None = Field(
        None, description="What must hold; the job gets a verdict."
    )
    max_samples: int = Field(500, ge=1, le=100_000, description="Per set, first N records.")
    max_new_tokens: int = Field(16, ge=1, le=512, description="Greedy tokens for KnowMem.")
    batch_size: int = Field(64, ge=1, le=4096)
    # Stop rule (probes every K steps); see core.engine.pipeline.
    probe_every: int | None = Field(
        None, ge=1, le=1_000_000, description="Probe every K steps; null = off."
    )
    probe_samples: int = Field(100, ge=1, le=10_000)
    forget_target: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Stop when the forget target metric falls to this share of before.",
    )
    forget_target_metric: Literal["knowmem", "verbmem", "mc"] = Field(
        "knowmem",
        description="The forget metric the stop rule probes: knowmem (eval.forget_qa), "
        "verbmem (eval.forget_text) or mc (eval.forget_mc).",
    )
    utility_budget: float = Field(
        0.1, ge=0, le=1, description="Max relative utility loss; the best state within it is kept."
    )

    @field_validator("forget_target_metric")
    @classmethod
    def _target_probed(cls, metric: str, info: ValidationInfo) -> str:
        """A named target needs the eval set its probe reads (checked where it is named)."""
        needs = FORGET_TARGET_SETS[metric]
        if not info.data.get(needs):
            raise ValueError(f"{metric!r} needs eval.{needs}, the set the stop rule probes")
        return metric

    def files(self) -> dict[str, str]:
        return {n: getattr(self, n) for n in EVAL_FILE_FIELDS if getattr(self, n)}


# The eval set the stop rule probes for each eval.forget_target_metric.
FORGET_TARGET_SETS = {"knowmem": "forget_qa", "verbmem": "forget_text", "mc": "forget_mc"}


def spec_file_ids(raw: dict) -> set[str]:
    """Every file a (serialised) job spec names: forget, retain, contrast, distill and eval
    files."""
    ids = {raw.get("forget_file"), raw.get("retain_file"), raw.get("contrast_file")}
    ids.add(raw.get("distill_file"))
    ids |= {v for k, v in (raw.get("eval") or {}).items() if k in EVAL_FILE_FIELDS}
    return {i for i in ids if i}
