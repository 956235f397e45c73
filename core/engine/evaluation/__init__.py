"""Before/after evidence: what the model still knows, and what unlearning cost
(`metrics`: KnowMem, VerbMem, MC through lm-eval-harness, perplexity, the trade-off).
The attacks and membership inference are core.engine.evaluation.robustness and core.engine.evaluation.privacy;
core.engine.evaluation.evidence runs them after the "after" metrics."""

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
