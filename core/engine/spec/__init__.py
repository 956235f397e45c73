"""The job spec: the same fields as `POST /v1/jobs` (the README's API and CLI sections),
typed and validated.

`unlearn run SPEC` reads it from YAML/JSON with local paths; the API validates the same
model (with file ids and registered model names) before a job row exists.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from core.engine.spec.methods import (
    TrainingParams,
    format_validation_error,
    get_method,
    parse_params,
)
from core.engine.spec.parts import AdapterSpec, EvalSpec, ResourcesSpec
from core.engine.spec.profiles import Profile, apply_profile
from core.engine.spec.robust import RobustifySpec
from core.errors import SpecError

# A name, an id or a path in a spec: non-empty, of a sane length.
Reference = Annotated[str, Field(min_length=1, max_length=4096)]


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    profile: Profile = Field(
        "standard",
        description="Defaults the spec starts from; fields it names win. robust: a KL "
        "retain term on in-domain retain data, selective updates, then distillation "
        "(needs retain_file and distill_file; docs/methods.md).",
    )
    method: str = Field(
        max_length=64,
        description="Unlearning method id: catnip, catnip_ref, catnip_seq, ga, npo, simnpo, "
        "flat, rmu, rmu_star.",
    )
    base_model: Reference = Field(
        description="Registered base model name (API) or local directory (CLI)."
    )
    forget_file: Reference = Field(description="Forget set: file id (API) or path (CLI).")
    retain_file: Reference | None = Field(
        None, description="Retain set, for retain_loss nll or kl, and for rmu."
    )
    contrast_file: Reference | None = Field(
        None,
        description="flat only: the expected response to each forget prompt, line by line "
        "(same kind and prompts as the forget set; any training kind for a text forget "
        "set). Null: built-in refusals.",
    )
    distill_file: Reference | None = Field(
        None,
        description="robustify only: the distillation set (purpose distill): retain and "
        "general text, never forget data (a submission whose records repeat the forget set's "
        "is refused, naming the lines).",
    )
    robustify: RobustifySpec | None = Field(
        None,
        description="Distillation after unlearning (shrink-and-perturb toward a fresh init, "
        "then distil the unlearned model into it on distill_file). Needs distill_file; the "
        "output is full weights, a LoRA job's adapter merged. Null: off.",
    )
    init_from_job: Reference | None = Field(
        None,
        description="Start from a previous succeeded job's output (sequential unlearning): "
        "its job id (API; the tenant's own job, on the same base model) or its output "
        "directory (CLI). After a LoRA job, a LoRA job writes one adapter for the whole "
        "chain, on the base model.",
    )
    eval: EvalSpec | None = Field(None, description="Eval sets and the stop rule.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    hyperparameters: SerializeAsAny[TrainingParams] = Field(
        default_factory=TrainingParams, description="Per-method hyperparameters (paper defaults)."
    )

    @model_validator(mode="before")
    @classmethod
    def _typed_hyperparameters(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = apply_profile(data)
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            raw = data.get("hyperparameters")
            if raw is None or isinstance(raw, dict):
                data = {**data, "hyperparameters": parse_params(data["method"], raw)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        method = get_method(self.method)
        retain_loss = self.hyperparameters.retain_loss
        if method.own_retain_term and retain_loss != "none":
            raise SpecError(
                f"hyperparameters.retain_loss: {self.method} has a retain term of its own; "
                "leave retain_loss at none",
                param="hyperparameters.retain_loss",
            )
        if retain_loss != "none" and not self.retain_file:
            raise SpecError(
                f"hyperparameters.retain_loss={retain_loss!r} needs a retain_file",
                param="retain_file",
            )
        if method.needs_retain and not self.retain_file:
            raise SpecError(
                f"method {self.method} needs a retain_file: its retain term keeps the retain "
                "data's hidden states at the frozen model's (rmu_star trains on forget data alone)",
                param="retain_file",
            )
        if self.contrast_file and not method.uses_contrast:
            raise SpecError(
                f"contrast_file: method {self.method} does not use contrast responses "
                "(flat does); remove it",
                param="contrast_file",
            )
        self._check_robust(method)
        if method.chooses_parameters and self.adapter.layers is not None:
            raise SpecError(
                f"adapter.layers: method {self.method} chooses what trains with "
                "hyperparameters.update_layers; leave adapter.layers null",
                param="adapter.layers",
            )
        if self.resources.gpus > 1:
            self._check_sharded(method)
        return self

    def _check_robust(self, method: Any) -> None:
        """Distillation needs its set and one device; selective updates need retain data and
        a method whose loss is its forget term (the step loss of rmu/flat holds more)."""
        params = self.hyperparameters
        if (self.robustify is None) != (self.distill_file is None):
            missing = "distill_file" if self.robustify is not None else "robustify"
            raise SpecError(
                f"{missing}: robustify and distill_file come together (the distillation "
                "stage and its data)",
                param=missing,
            )
        if self.robustify is not None and (
            self.resources.gpus > 1 or self.adapter.quantize is not None
        ):
            raise SpecError(
                "robustify: the distillation stage runs on one device with the teacher's and "
                "the student's full weights; set resources.gpus to 1 and drop adapter.quantize",
                param="robustify",
            )
        robust = params.selective is not None or params.attack_in_loop is not None
        if robust and (method.step_loss is not None or self.resources.gpus > 1):
            raise SpecError(
                f"hyperparameters.selective/attack_in_loop: {self.method} has a step loss of "
                "its own (or the job is sharded); use a method whose loss is its forget term "
                "(catnip, npo, simnpo, ga, ...) on one device",
                param="hyperparameters.selective"
                if params.selective is not None
                else "hyperparameters.attack_in_loop",
            )
        if params.selective is not None and not self.retain_file:
            raise SpecError(
                "hyperparameters.selective needs a retain_file: the directions it keeps are "
                "those of the retain data (in-domain neighbours belong there)",
                param="retain_file",
            )

    def _check_sharded(self, method: Any) -> None:
        """What a job sharded over resources.gpus devices can be: full weights of every
        layer (a LoRA adapter or a few layers fit one device), a method whose loss comes
        from the model's outputs (RMU reads and steers one layer's hidden states through
        hooks, and trains a few projections: one device), and micro-batches that split
        evenly between the devices."""
        gpus = self.resources.gpus
        if self.adapter.type != "full" or self.adapter.layers is not None:
            raise SpecError(
                f"resources.gpus {gpus}: sharding is for full-weight jobs on every layer "
                "(adapter type full, layers null); a LoRA adapter or a few layers fit one "
                "device: set resources.gpus to 1",
                param="resources.gpus",
            )
        if method.chooses_parameters:
            raise SpecError(
                f"resources.gpus {gpus}: {self.method} trains a few projections of three "
                "layers and fits one device; set resources.gpus to 1",
                param="resources.gpus",
            )
        accumulation = self.hyperparameters.gradient_accumulation_steps
        if accumulation % gpus:
            raise SpecError(
                f"hyperparameters.gradient_accumulation_steps {accumulation} does not split "
                f"between {gpus} devices: each takes an equal share of a step's micro-batches; "
                f"use a multiple of {gpus}",
                param="hyperparameters.gradient_accumulation_steps",
            )


def parse_spec(raw: Any) -> JobSpec:
    """Validate a raw mapping; SpecError with one readable line per problem otherwise."""
    if not isinstance(raw, dict):
        raise SpecError("the job spec must be a JSON/YAML object")
    check_values(raw)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        raise SpecError(
            format_validation_error(exc, ""), param=".".join(str(x) for x in first) or None
        ) from None


def check_values(value: Any, where: str = "") -> None:
    """SpecError naming the field where any string in `value` is not valid text (a NUL
    character, or half of a UTF-16 surrogate pair: no character at all, which no database
    stores and no JSON encoder writes as UTF-8) or any number is not finite."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise SpecError(f"{where or 'the spec'}: {problem}", param=where or None)
    elif isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where or 'the spec'}: must be a finite number", param=where or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_values(str(key), f"{where}.(a key)" if where else "(a key)")
            check_values(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_values(item, f"{where}.{index}")


def text_problem(value: str) -> str | None:
    """Why `value` is not text a person could have meant, or None."""
    if "\x00" in value:
        return "contains a NUL character"
    if any("\ud800" <= char <= "\udfff" for char in value):
        return "contains half of a UTF-16 surrogate pair (\\uD800-\\uDFFF), which is no character"
    return None


def load_spec(path: str | Path) -> JobSpec:
    """A spec file (YAML or JSON). Relative paths in it are relative to the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read the spec {path}: {exc}") from None
    spec = parse_spec(raw)
    return resolve_paths(spec, path.parent)


def resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    def fix(value: str | None) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    update: dict[str, Any] = {
        "base_model": fix(spec.base_model),
        "forget_file": fix(spec.forget_file),
        "retain_file": fix(spec.retain_file),
        "contrast_file": fix(spec.contrast_file),
        "distill_file": fix(spec.distill_file),
        "init_from_job": fix(spec.init_from_job),
    }
    if spec.eval is not None:
        update["eval"] = spec.eval.model_copy(
            update={k: fix(v) for k, v in spec.eval.files().items()}
        )
    return spec.model_copy(update=update)
