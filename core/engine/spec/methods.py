"""The closed registry of unlearning methods, keyed by stable lowercase ids.

Each method is one loss function and one typed hyperparameter model whose defaults
are the paper's (appendix A.4.4, the QA forget set, unless noted). The API validates
a job's `method` and `hyperparameters` against this registry before a job exists;
`unlearn run` does the same. Adding a method is one function plus one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import ValidationError

from core.engine.spec.params import (  # noqa: F401 - re-exported: the registry's parameters
    MAX_STEPS,
    CatnipParams,
    FLATParams,
    GAParams,
    NPOParams,
    RMUParams,
    RMUStarParams,
    SimNPOParams,
    TrainingParams,
)
from core.errors import SpecError

if TYPE_CHECKING:
    import torch


def _losses() -> ModuleType:
    """core.engine.losses (torch) is imported when a loss runs, not when the API validates a spec."""
    from core.engine import losses

    return losses


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
# A loss from the micro-batches themselves (core.engine.steps): for a method that needs
# more than one forward's logits (FLAT: a contrast batch; RMU: hidden states, retain data).
StepLoss = Callable[[Any, P], tuple["torch.Tensor", dict[str, float]]]
Setup = Callable[[Any, P], Any]


@dataclass(frozen=True)
class Method(Generic[P]):
    """A method's loss is one of: `forget_loss`, from the token log-probs (and the
    reference's, if `uses_reference`); `loss_from_logits`, from the logits directly; or
    `step_loss`, from the micro-batches (core.engine.steps), with an optional `setup`.
    What data it needs beyond the forget set: `needs_retain` (a retain_file is required),
    `uses_contrast` (a contrast_file is read, else built-in refusals); `own_retain_term`:
    its loss has a retain term of its own, so hyperparameters.retain_loss stays none;
    `chooses_parameters`: its setup decides what trains, so adapter.layers stays null."""

    id: str
    summary: str
    params: type[P]
    forget_loss: ForgetLoss[P] | None
    uses_reference: bool = False
    loss_from_logits: LogitsLoss[P] | None = None
    step_loss: StepLoss[P] | None = None
    setup: Setup[P] | None = None
    needs_retain: bool = False
    uses_contrast: bool = False
    own_retain_term: bool = False
    chooses_parameters: bool = False
    data: str = "forget"  # for tables: what the method trains on

    def __post_init__(self) -> None:
        forms = (self.forget_loss, self.loss_from_logits, self.step_loss)
        if sum(form is not None for form in forms) != 1:
            raise ValueError(
                f"method {self.id}: give one of forget_loss, loss_from_logits, step_loss"
            )

    def needs_reference(self, params: TrainingParams) -> bool:
        """A reference model exists only when the loss or the retain term needs one."""
        return self.uses_reference or params.retain_loss == "kl"


def _steps() -> ModuleType:
    """core.engine.steps (torch), imported when a step runs."""
    from core.engine import steps

    return steps


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
        Method[FLATParams](
            "flat",
            "FLAT: f-divergence (Total Variation) between expected and forget responses",
            FLATParams,
            None,
            step_loss=lambda inputs, p: _steps().flat_step(inputs, p),
            uses_contrast=True,
            data="forget + contrast",
        ),
        Method[RMUParams](
            "rmu",
            "RMU: steer a layer's hidden states on forget data to a random direction, "
            "keep retain data's at the frozen model's",
            RMUParams,
            None,
            step_loss=lambda inputs, p: _steps().rmu_step(inputs, p),
            setup=lambda wrapped, p: _steps().rmu_setup(wrapped, p),
            needs_retain=True,
            own_retain_term=True,
            chooses_parameters=True,
            data="forget + retain",
        ),
        Method[RMUStarParams](
            "rmu_star",
            "RMU*: RMU's forget term alone, forget data only (paper Table 1)",
            RMUStarParams,
            None,
            step_loss=lambda inputs, p: _steps().rmu_step(inputs, p),
            setup=lambda wrapped, p: _steps().rmu_setup(wrapped, p),
            own_retain_term=True,
            chooses_parameters=True,
        ),
    )
}


def prepare(wrapped: Any, method: Method[Any], params: TrainingParams) -> Any:
    """The method's setup on this model (a core.engine.modeling.Wrapped), once: a second
    call returns the first's state (the pipeline prepares before it fingerprints the run,
    the loop again to be sure)."""
    if method.setup is None:
        return None
    key = (method.id, params.model_dump_json())
    if wrapped.prepared is None or wrapped.prepared[0] != key:
        wrapped.prepared = (key, method.setup(wrapped, params))
    return wrapped.prepared[1]


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
