"""The typed pieces of a job spec that are not hyperparameters: the adapter and the
eval sets. Pure pydantic (no torch), so the API validates a job without loading torch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.engine.formats import Kind

# The file kinds (core.engine.formats) each slot of a job accepts.
TRAIN_FILE_KINDS: tuple[Kind, ...] = ("qa", "chat", "text")
EVAL_FILE_KINDS: dict[str, tuple[Kind, ...]] = {
    "forget_qa": ("qa",),
    "retain_qa": ("qa",),
    "forget_text": ("text",),
    "retain_text": ("text",),
    "forget_mc": ("mc",),
    "general_mc": ("mc",),
}
EVAL_FILE_FIELDS = tuple(EVAL_FILE_KINDS)


ModuleNames = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=200)]], Field(min_length=1, max_length=256)
]
LayerIndices = Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(max_length=1024)]


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

    @model_validator(mode="after")
    def _check(self) -> AdapterSpec:
        if self.layers is not None and self.type != "full":
            raise ValueError("'layers' applies only to adapter type 'full'")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError("'layers' must be non-negative layer indices")
        if self.layers == []:
            raise ValueError("'layers' is empty: name at least one layer, or null for all")
        return self


class EvalSpec(BaseModel):
    """Eval sets of a job (paths locally, file ids over the API) and their settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    forget_qa: str | None = Field(None, description="QA about what must be forgotten (KnowMem).")
    retain_qa: str | None = Field(None, description="QA about what must survive (utility KnowMem).")
    forget_text: str | None = Field(None, description="Forget-domain text (VerbMem).")
    retain_text: str | None = Field(None, description="Retain text (perplexity).")
    forget_mc: str | None = Field(None, description="Forget-domain multiple choice (lm-eval).")
    general_mc: str | None = Field(None, description="General multiple choice (lm-eval).")
    max_samples: int = Field(500, ge=1, le=100_000, description="Per set, first N records.")
    max_new_tokens: int = Field(16, ge=1, le=512, description="Greedy tokens for KnowMem.")
    batch_size: int = Field(64, ge=1, le=4096)
    # Stop rule (probes every K steps); see core.engine.pipeline.
    probe_every: int | None = Field(
        None, ge=1, le=1_000_000, description="Probe every K steps; null = off."
    )
    probe_samples: int = Field(100, ge=1, le=10_000)
    forget_target: float = Field(
        0.1, ge=0, le=1, description="Stop when forget KnowMem falls to this share of before."
    )
    utility_budget: float = Field(
        0.1, ge=0, le=1, description="Max relative utility loss; the best state within it is kept."
    )

    def files(self) -> dict[str, str]:
        return {n: getattr(self, n) for n in EVAL_FILE_FIELDS if getattr(self, n)}


def spec_file_ids(raw: dict) -> set[str]:
    """Every file a (serialised) job spec names: forget, retain and eval files."""
    ids = {raw.get("forget_file"), raw.get("retain_file")}
    ids |= {v for k, v in (raw.get("eval") or {}).items() if k in EVAL_FILE_FIELDS}
    return {i for i in ids if i}
