"""What a job's metrics say, as rows and lines for people: the before/after table and
the evidence. Pure Python (no torch), so the report, the CLI and the API's dashboard
show the same words and figures."""

from __future__ import annotations

from typing import Any


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def before_after_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, reference) rows for whatever was measured; the reference
    column is the reference model's figure (a model that never saw the forget set), or
    empty where none was measured."""
    before, after = metrics.get("before", {}), metrics.get("after", {})
    reference = metrics.get("reference")
    rows = []
    spec = [
        ("forget_knowmem", "rouge_l_f1", "Forget KnowMem ROUGE-L F1 (lower is better)", 100),
        ("forget_knowmem", "rouge_l_recall", "Forget KnowMem ROUGE-L recall", 100),
        ("forget_verbmem", "rouge_l_f1", "Forget VerbMem ROUGE-L F1 (lower is better)", 100),
        ("forget_mc", "accuracy", "Forget-domain MC accuracy (lower is better)", 100),
        ("retain_knowmem", "rouge_l_f1", "Retain KnowMem ROUGE-L F1 (higher is better)", 100),
        (
            "retain_knowmem_unwatched",
            "rouge_l_f1",
            "Retain KnowMem F1, questions the stop rule did not watch",
            100,
        ),
        ("general_mc", "accuracy", "General MC accuracy (higher is better)", 100),
        ("retain_perplexity", "perplexity", "Retain perplexity (lower is better)", 1),
    ]
    for key, field, label, scale in spec:
        if key in before or key in after:
            b = before.get(key, {}).get(field)
            a = after.get(key, {}).get(field)
            r = reference.get(key, {}).get(field) if reference else None
            rows.append(
                (
                    label,
                    fmt(None if b is None else b * scale),
                    fmt(None if a is None else a * scale),
                    "" if reference is None else fmt(None if r is None else r * scale),
                )
            )
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


_QUANTIZED = (
    ("forget_knowmem", "rouge_l_f1", "forget KnowMem F1"),
    ("forget_verbmem", "rouge_l_f1", "VerbMem"),
    ("forget_mc", "accuracy", "MC"),
    ("retain_knowmem", "rouge_l_f1", "utility KnowMem F1"),
    ("general_mc", "accuracy", "general MC"),
)


def _relearn_mc(mc: dict[str, Any] | None) -> str:
    """The relearning attack's forget MC, as the end of its line ('' when not measured)."""
    if not mc or mc.get("after_attack") is None:
        return ""
    return (
        f" Forget MC accuracy on {mc['scope']} ({mc['items']} items): {_pct(mc['after'])} "
        f"after, {_pct(mc['after_attack'])} after the attack."
    )


def _quantized_figures(figures: dict[str, Any]) -> str:
    """One model's forget and utility figures in points, and its retain perplexity."""
    parts = [
        f"{label} {_pct(figures[key].get(field))}"
        for key, field, label in _QUANTIZED
        if key in figures
    ]
    if "retain_perplexity" in figures:
        parts.append(f"perplexity {fmt(figures['retain_perplexity'].get('perplexity'))}")
    return ", ".join(parts) or "n/a"


def evidence_lines(metrics: dict[str, Any]) -> list[str]:
    """The robustness audits, membership inference and the verdict, one line each, in
    points (percent) where they are scores."""
    lines = []
    robust = metrics.get("robustness") or {}
    relearn = robust.get("relearn") or {}
    if relearn.get("status") == "done":
        f1, s = relearn["forget_knowmem_f1"], relearn["settings"]
        lines.append(
            f"Relearning attack ({s['steps']} steps at lr {s['learning_rate']:g} on {s['attack_questions']} "
            f"forget questions, {s['trains']}): forget KnowMem F1 on the other {s['measured_questions']} "
            f"{_pct(f1['before'])} before, {_pct(f1['after'])} after, {_pct(f1['after_attack'])} after the "
            f"attack; recovery {fmt(relearn['recovery'])}." + _relearn_mc(relearn.get("forget_mc"))
        )
    elif relearn:
        lines.append(f"Relearning attack: off ({relearn['reason']}).")
    quant = robust.get("quantization") or {}
    if quant.get("status") == "done":
        levels = {"unquantized": quant["baseline"].get("unquantized") or {}, **quant["levels"]}
        parts = [f"{scheme}: {_quantized_figures(figures)}" for scheme, figures in levels.items()]
        lines.append(
            f"Quantization (group {quant['settings']['group_size']}, "
            f"{quant['settings'].get('measured', 'KnowMem')}; NF4 {quant['settings']['nf4']}): "
            + "; ".join(parts)
            + "."
        )
    elif quant:
        lines.append(f"Quantization: off ({quant['reason']}).")
    icl = robust.get("in_context") or {}
    if icl.get("status") == "done":
        f1 = icl["forget_knowmem_f1"]
        lines.append(
            f"In-context extraction ({icl['settings']['shots']} forget QA pairs before each "
            f"question): forget KnowMem F1 {_pct(f1['with_context'])} (after, without them: "
            f"{_pct(f1['after'])}); recovery {fmt(icl['recovery'])}."
        )
    elif icl:
        lines.append(f"In-context extraction: off ({icl['reason']}).")
    privacy = metrics.get("privacy") or {}
    after = privacy.get("after") or {}
    if after.get("status") == "done":
        line = (
            f"Membership inference (forget set vs holdout, k={after['k']}): Min-K% AUC "
            f"{fmt((privacy.get('before') or {}).get('min_k_auc'), 3)} before, "
            f"{fmt(after['min_k_auc'], 3)} after; Min-K%++ "
            f"{fmt((privacy.get('before') or {}).get('min_k_plus_plus_auc'), 3)} before, "
            f"{fmt(after['min_k_plus_plus_auc'], 3)} after"
        )
        reference = privacy.get("reference") or {}
        if reference.get("status") == "done":
            leak = privacy.get("privleak", {}).get("after", {})
            line += (
                f"; reference model {fmt(reference['min_k_auc'], 3)} / "
                f"{fmt(reference['min_k_plus_plus_auc'], 3)}; PrivLeak "
                f"{fmt(leak.get('min_k'), 3)} / {fmt(leak.get('min_k_plus_plus'), 3)}"
            )
        lines.append(line + ".")
    elif after:
        lines.append(f"Membership inference: off ({after['reason']}).")
    if "verdict" in metrics:
        rows = metrics.get("criteria") or []
        detail = "; ".join(
            f"{r['criterion']} {r['threshold']}: {fmt(r['value'], 3)} "
            + (
                "passed"
                if r["passed"]
                else "FAILED"
                if r["passed"] is False
                else f"not evaluated ({r['reason']})"
            )
            for r in rows
        )
        lines.append(
            f"Verdict: **{metrics['verdict']}**"
            + (f" ({detail})." if detail else " (no criteria were declared).")
        )
    return lines
