"""Before/after evidence: what the model still knows, and what unlearning cost
(`metrics`: KnowMem, VerbMem, MC through lm-eval-harness, perplexity, the trade-off).
The attacks and membership inference are core.engine.evaluation.robustness and core.engine.evaluation.privacy;
core.engine.evaluation.evidence runs them after the "after" metrics."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.engine.evaluation.metrics import (
        PER_RECORD,
        EvalSpec,
        evaluate,
        forget_score,
        greedy_generate,
        knowmem,
        mc_accuracy,
        mc_figures,
        on_first,
        perplexity,
        rouge_l,
        strip_per_record,
        tradeoff,
        utility_score,
        verbmem,
    )

__all__ = [
    "PER_RECORD",
    "EvalSpec",
    "evaluate",
    "forget_score",
    "greedy_generate",
    "knowmem",
    "mc_accuracy",
    "mc_figures",
    "on_first",
    "perplexity",
    "rouge_l",
    "strip_per_record",
    "tradeoff",
    "utility_score",
    "verbmem",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the package's torch-free modules (summary, which the API's job
    # objects use) import without torch, as in the API image.
    if name in __all__:
        from core.engine.evaluation import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
