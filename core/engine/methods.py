"""The closed registry of unlearning methods, keyed by stable lowercase ids.

Each method is one loss function and one typed hyperparameter model whose defaults
are the paper's (appendix A.4.4, the QA forget set, unless noted). The API validates
a job's `method` and `hyperparameters` against this registry before a job exists;
`unlearn run` does the same. Adding a method is one function plus one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import SpecError

if TYPE_CHECKING:
    import torch


def _losses():
    """core.engine.losses (torch) is imported when a loss runs, not when the API validates a spec."""
    from core.engine import losses

    return losses


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
    forget_eos: bool = Field(
        False,
        description="Count the end-of-sequence token after each forget response (QA/chat) as "
        "a forget target. Off by default: it carries none of the knowledge, every answer in "
        "every domain ends with it, and pushing it down teaches the model not to stop, "
        "which damages all answers (measured on the demo benchmark: docs/evaluation.md).",
    )


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


@dataclass(frozen=True)
class ForgetTerms:
    """What a forget loss may use, all [B, T]: log z (grad), log(1-z) and ref log z (detached),
    and the labels (-100 = does not count)."""

    logp: torch.Tensor
    log1m: torch.Tensor
    labels: torch.Tensor
    ref_logp: torch.Tensor | None


P = TypeVar("P", bound=TrainingParams)
ForgetLoss = Callable[[ForgetTerms, P], "torch.Tensor"]
# A loss from the logits [B, T, V] and labels [B, T] in one call, for a method whose loss
# needs nothing else: the loss backend may then fuse all of it (CATNIP on the triton
# backend is three kernels instead of the log-probs' two and ~20 small ops).
LogitsLoss = Callable[["torch.Tensor", "torch.Tensor", P], "torch.Tensor"]


@dataclass(frozen=True)
class Method(Generic[P]):
    """A method's forget loss is one of: `forget_loss`, from the token log-probs (and the
    reference's, if `uses_reference`), or `loss_from_logits`, from the logits directly."""

    id: str
    summary: str
    params: type[P]
    forget_loss: ForgetLoss[P] | None
    uses_reference: bool = False
    loss_from_logits: LogitsLoss[P] | None = None

    def __post_init__(self) -> None:
        if (self.forget_loss is None) == (self.loss_from_logits is None):
            raise ValueError(
                f"method {self.id}: give forget_loss or loss_from_logits, not both or neither"
            )

    def needs_reference(self, params: TrainingParams) -> bool:
        """A reference model exists only when the loss or the retain term needs one."""
        return self.uses_reference or params.retain_loss == "kl"


def _mask(t: ForgetTerms, p: TrainingParams) -> torch.Tensor:
    return _losses().strided_mask(t.labels, getattr(p, "token_stride", 1))


def _ref(t: ForgetTerms) -> torch.Tensor:
    if t.ref_logp is None:
        raise RuntimeError("this method needs reference log-probs")
    return t.ref_logp


METHODS: dict[str, Method[Any]] = {
    m.id: m
    for m in (
        Method[CatnipParams](
            "catnip",
            "CATNIP: token-level, calibrated by the model's own reverse probability (eq. 8)",
            CatnipParams,
            None,
            loss_from_logits=lambda logits, labels, p: _losses().catnip_loss(
                logits, labels, p.beta, p.token_stride
            ),
        ),
        Method[CatnipParams](
            "catnip_ref",
            "Ablation: CATNIP with the frozen initial model as reference (Table 3)",
            CatnipParams,
            lambda t, p: _losses().catnip_ref_from_logprobs(t.logp, _ref(t), _mask(t, p), p.beta),
            uses_reference=True,
        ),
        Method[CatnipParams](
            "catnip_seq",
            "Ablation 'w/o CAT': sequence level, beta/|y| inside the sigmoid (Table 3)",
            CatnipParams,
            lambda t, p: _losses().catnip_seq_from_logprobs(t.logp, t.log1m, _mask(t, p), p.beta),
        ),
        Method[GAParams](
            "ga",
            "Gradient ascent on the forget set",
            GAParams,
            lambda t, p: _losses().ga_from_logprobs(t.logp, _mask(t, p)),
        ),
        Method[NPOParams](
            "npo",
            "NPO: negative preference optimisation against the frozen model (eq. 4)",
            NPOParams,
            lambda t, p: _losses().npo_from_logprobs(t.logp, _ref(t), _mask(t, p), p.beta),
            uses_reference=True,
        ),
        Method[SimNPOParams](
            "simnpo",
            "SimNPO: length-normalised NPO with margin gamma, no reference",
            SimNPOParams,
            lambda t, p: _losses().simnpo_from_logprobs(t.logp, _mask(t, p), p.beta, p.gamma),
        ),
    )
}


def get_method(method_id: str) -> Method[Any]:
    try:
        return METHODS[method_id]
    except KeyError:
        valid = ", ".join(sorted(METHODS))
        raise SpecError(
            f"unknown method {method_id!r}; valid methods: {valid}", param="method"
        ) from None


def format_validation_error(exc: ValidationError, prefix: str) -> str:
    """One line per problem: `hyperparameters.learning_rate: Input should be greater than 0`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_params(method_id: str, raw: dict | None) -> TrainingParams:
    """Validate raw hyperparameters against the method's typed model."""
    method = get_method(method_id)
    try:
        return method.params.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        param = "hyperparameters." + ".".join(str(x) for x in first) if first else None
        raise SpecError(format_validation_error(exc, "hyperparameters"), param=param) from None
