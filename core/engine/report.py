"""Report artifacts a compliance user can file: a one-page summary with the before/after
table, the loss curve, and the token-level view of paper Fig. 2 (per-token probability
of sample forget answers before and after, as JSON and a PNG heatmap)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.engine.data import LEFT_OUT, Example, collate, line_list
from core.engine.evaluation.summary import before_after_rows, evidence_lines, fmt, headline
from core.engine.losses import token_logprobs


@torch.no_grad()
def token_probabilities(
    model: Any, tokenizer: Any, examples: list[Example]
) -> list[dict[str, Any]]:
    """For each example: its target tokens and pi(y_i | x, y_<i) of each."""
    if not examples:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batch = collate(examples, tokenizer.pad_token_id)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    labels = batch["labels"].to(device)
    logp, _ = token_logprobs(logits, labels)
    model.train(was_training)
    out = []
    for row, example in enumerate(examples):
        mask = labels[row] != -100
        ids = labels[row][mask].tolist()
        prompt = [
            i for i, lab in zip(example.input_ids, example.labels, strict=True) if lab == -100
        ]
        out.append(
            {
                "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                "tokens": tokenizer.convert_ids_to_tokens(ids),
                "probabilities": [round(float(p), 6) for p in logp[row][mask].exp().tolist()],
            }
        )
    return out


def _data_line(name: str, data: dict[str, Any]) -> str:
    """What the unlearning trained on, and what max_length cut or left out."""
    line = (
        f"- {name.capitalize()} set as trained: {data['records']:,} records, "
        f"{data['examples']:,} sequences, {data['target_tokens']:,} target tokens "
        f"(max_length {data['max_length']})"
    )
    for key, what in (
        ("skipped", f"left out: no target token within max_length, not {LEFT_OUT[name]}"),
        ("truncated", "target cut at max_length"),
    ):
        part = data[key]
        if part["count"]:
            line += (
                f"; **{part['count']:,} {what}** (lines {line_list(part['lines'], part['count'])})"
            )
    if "source" in data:  # FLAT's expected responses: which ones, and how they pair
        pairing = "paired with the forget records line by line" if data["paired"] else "unpaired"
        line += f"; from the {data['source']}, {pairing}"
    return line


def _chain_lines(chain: list[dict[str, Any]] | None) -> list[str]:
    """Where a sequential job started: the previous job and the chain before it."""
    if not chain:
        return []
    names = [f"`{link['job']}` ({link.get('method') or '?'})" for link in chain]
    return [
        f"- Starts from: {names[-1]}'s output ({chain[-1].get('output', 'adapter')})",
        f"- Chain, first job first: {' -> '.join(names)} -> this job",
    ]


def summary_markdown(
    spec: Any, metrics: dict[str, Any], shown: dict[str, str] | None = None
) -> str:
    """The report's summary. `shown` names the base model and the forget file as the
    reader knows them (the service: the model's name, the file's id and name), in place
    of the local paths the job ran on."""
    shown = shown or {}
    lines = [
        f"# Unlearning report: {spec.method}",
        "",
        f"- Base model: `{shown.get('base_model', spec.base_model)}`",
        f"- Forget set: `{shown.get('forget_file', spec.forget_file)}`",
        *_chain_lines(metrics.get("chain")),
        f"- Adapter: {spec.adapter.type}",
        f"- Steps: {metrics['steps']['done']} of {metrics['steps']['planned']} planned",
    ]
    lines += [_data_line(name, data) for name, data in metrics.get("data", {}).items()]
    lines.append("")
    lead = headline(metrics)
    if lead:
        lines += [f"**{lead}**", ""]
    rows = before_after_rows(metrics)
    if rows:
        if metrics.get("reference"):
            lines += [
                "| metric | before | after | reference model (never saw the forget set) |",
                "|---|---:|---:|---:|",
            ]
            lines += [f"| {m} | {b} | {a} | {r} |" for m, b, a, r in rows]
        else:
            lines += ["| metric | before | after |", "|---|---:|---:|"]
            lines += [f"| {m} | {b} | {a} |" for m, b, a, _ in rows]
        lines.append("")
    evidence = evidence_lines(metrics)
    if evidence:
        lines += [*evidence, ""]
    t = metrics.get("tradeoff")
    if t:
        lines.append(
            f"Trade-off (points): delta f = {fmt(t['delta_f'])}, "
            f"delta u = {fmt(t['delta_u'])}, dO = -delta f + delta u = {fmt(t['delta_o'])}."
        )
        lines.append("")
    stop = metrics.get("stop_rule")
    if stop:
        lines.append(
            f"Stop rule: probes every {stop['every']} steps; "
            f"{'stopped early: ' + stop['reason'] if stop['stopped_early'] else 'ran to the end'}; "
            f"restored step: {stop['restored_step'] or 'none (final state kept)'}."
        )
        lines.append("")
    lines.append(
        "Files: `metrics.json` (every number with its settings), `loss_curve.png`, "
        "`token_probabilities.json` / `.png` (paper Fig. 2 view)."
    )
    return "\n".join(lines) + "\n"


def _plot_loss(history: list[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h.step for h in history], [h.loss for h in history], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Unlearning loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tokens(view: dict[str, list[dict[str, Any]]], path: Path, samples: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = view["before"][:samples], view["after"][:samples]
    if not before:
        return
    fig, axes = plt.subplots(len(before), 1, figsize=(10, 1.3 * len(before) + 0.6), squeeze=False)
    for ax, b, a in zip(axes[:, 0], before, after, strict=True):
        tokens = b["tokens"][:40]
        grid = [b["probabilities"][:40], a["probabilities"][:40]]
        ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks([0, 1], ["before", "after"])
        ax.set_xticks(range(len(tokens)), tokens, rotation=60, fontsize=7)
        ax.set_title(b["prompt"][-80:], fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    directory: Path,
    *,
    spec: Any,
    metrics: dict[str, Any],
    history: list[Any],
    token_view: dict[str, list[dict[str, Any]]],
    shown: dict[str, str] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (directory / "loss_curve.json").write_text(
        json.dumps(
            [{"step": h.step, "loss": h.loss, **h.terms, "lr": h.learning_rate} for h in history]
        )
    )
    (directory / "token_probabilities.json").write_text(json.dumps(token_view, indent=1))
    (directory / "summary.md").write_text(summary_markdown(spec, metrics, shown))
    if history:
        _plot_loss(history, directory / "loss_curve.png")
    _plot_tokens(token_view, directory / "token_probabilities.png")
    return directory
