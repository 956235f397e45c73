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
        ("neighbor_knowmem", "rouge_l_f1", "Neighbour KnowMem ROUGE-L F1 (higher is better)", 100),
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


# The forget metrics, each as (metrics key, figure, label); what forget_standing ranks.
FORGET_METRICS = (
    ("forget_knowmem", "rouge_l_f1", "forget KnowMem F1"),
    ("forget_verbmem", "rouge_l_f1", "forget VerbMem F1"),
    ("forget_mc", "accuracy", "forget MC accuracy"),
)
STANDING_DEFINITION = (
    "each forget metric's knowledge_left: (after - reference) / (before - reference) where a "
    "reference model was measured and before is above it, else after / before; the metric "
    "with the highest knowledge_left still shows the most knowledge"
)


def _figure(metrics: dict[str, Any] | None, key: str, field: str) -> float | None:
    value = ((metrics or {}).get(key) or {}).get(field)
    return None if value is None else float(value)


def forget_standing(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Every forget metric measured before and after, against its before figure
    (share_of_before) and the reference model's (above_reference, in the metric's units),
    and `worst`: the one with the most knowledge left (STANDING_DEFINITION). None where
    no forget metric has both figures."""
    before, after, reference = metrics.get("before"), metrics.get("after"), metrics.get("reference")
    rows: list[dict[str, Any]] = []
    for key, field, label in FORGET_METRICS:
        b, a, r = _figure(before, key, field), _figure(after, key, field), None
        if b is None or a is None:
            continue
        r = _figure(reference, key, field)
        share = a / b if b > 0 else None
        left = (a - r) / (b - r) if r is not None and b - r > 1e-9 else share
        rows.append(
            {
                "metric": key,
                "label": label,
                "before": b,
                "after": a,
                "reference": r,
                "share_of_before": share,
                "above_reference": None if r is None else a - r,
                "knowledge_left": left,
            }
        )
    if not rows:
        return None
    ranked = [row for row in rows if row["knowledge_left"] is not None] or rows
    worst = max(ranked, key=lambda row: row["knowledge_left"] or 0.0)
    return {"worst": worst["metric"], "metrics": rows, "definition": STANDING_DEFINITION}


def _standing_part(row: dict[str, Any]) -> str:
    text = f"{row['label']} {_pct(row['after'])} after, {_pct(row['before'])} before"
    if row["share_of_before"] is not None:
        text += f" ({_pct(row['share_of_before'])}% of it)"
    if row["reference"] is not None:
        text += f", reference {_pct(row['reference'])} ({100 * row['above_reference']:+.1f} points)"
    return text


def headline(metrics: dict[str, Any]) -> str | None:
    """The summary's first line: the forget metric that still shows the most knowledge,
    then the others; None where no forget metric was measured before and after."""
    standing = forget_standing(metrics)
    if standing is None:
        return None
    rows = {row["metric"]: row for row in standing["metrics"]}
    worst = rows.pop(standing["worst"])
    line = f"Most knowledge left: {_standing_part(worst)}"
    if worst["knowledge_left"] is not None:
        line += f"; knowledge left {fmt(worst['knowledge_left'])}"
    others = "; ".join(_standing_part(row) for row in rows.values())
    return line + (f". Then: {others}." if others else ".")


def neighbor_line(metrics: dict[str, Any]) -> str | None:
    """Neighbour KnowMem (eval.neighbor_qa) before and after, and the reference's."""
    b = _figure(metrics.get("before"), "neighbor_knowmem", "rouge_l_f1")
    a = _figure(metrics.get("after"), "neighbor_knowmem", "rouge_l_f1")
    if b is None or a is None:
        return None
    line = f"Neighbours (eval.neighbor_qa): KnowMem F1 {_pct(b)} before, {_pct(a)} after"
    if b > 0:
        line += f" ({_pct(a / b)}% kept)"
    r = _figure(metrics.get("reference"), "neighbor_knowmem", "rouge_l_f1")
    return line + (f"; reference {_pct(r)}." if r is not None else ".")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def recovery_text(value: float | None) -> str:
    """A recovery in words where its sign needs them: below 0 the attack did not bring the
    knowledge back but removed more of it."""
    if value is not None and value < 0:
        return f"{fmt(value)} (negative: the attack made it forget more)"
    return fmt(value)


_QUANTIZED = (
    ("forget_knowmem", "rouge_l_f1", "forget KnowMem F1"),
    ("forget_verbmem", "rouge_l_f1", "VerbMem"),
    ("forget_mc", "accuracy", "MC"),
    ("neighbor_knowmem", "rouge_l_f1", "neighbour KnowMem F1"),
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


_IN_CONTEXT_OTHERS = (
    ("forget_verbmem_f1", "forget VerbMem F1"),
    ("forget_mc", "forget MC accuracy"),
    ("neighbor_knowmem_f1", "neighbour KnowMem F1"),
)


def _in_context_others(icl: dict[str, Any]) -> str:
    """The in-context audit's other metrics, with the context and without it."""
    parts = [
        f"{label} {_pct(icl[key]['with_context'])} (without: {_pct(icl[key]['after'])})"
        for key, label in _IN_CONTEXT_OTHERS
        if key in icl
    ]
    return f" With the same context: {'; '.join(parts)}." if parts else ""


def evidence_lines(metrics: dict[str, Any]) -> list[str]:
    """The robustness audits, membership inference and the verdict, one line each, in
    points (percent) where they are scores."""
    lines = [line] if (line := neighbor_line(metrics)) else []
    robust = metrics.get("robustness") or {}
    relearn = robust.get("relearn") or {}
    if relearn.get("status") == "done":
        f1, s = relearn["forget_knowmem_f1"], relearn["settings"]
        lines.append(
            f"Relearning attack ({s['steps']} steps at lr {s['learning_rate']:g} on {s['attack_questions']} "
            f"forget questions, {s['trains']}): forget KnowMem F1 on the other {s['measured_questions']} "
            f"{_pct(f1['before'])} before, {_pct(f1['after'])} after, {_pct(f1['after_attack'])} after the "
            f"attack; recovery {recovery_text(relearn['recovery'])}."
            + _relearn_mc(relearn.get("forget_mc"))
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
            f"{_pct(f1['after'])}); recovery {recovery_text(icl['recovery'])}."
            + _in_context_others(icl)
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
