"""`unlearn bench`: CATNIP and the baselines on the demo benchmark, side by side.

Every run uses the same settings (full weights, max_steps, batch, the stop rule at the
same utility budget, the same eval sets); only the method, its learning rate, the
optional retain term and the optional sharpness-aware training vary. Writes results.json, a Markdown table and the trade-off plot
of paper Fig. 3 (forget drop against utility change, one point per run).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.engine.spec.methods import METHODS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchRun:
    method: str
    learning_rate: float | None  # None = the method's paper default (A.4.4)
    retain_loss: str = "none"
    sam_rho: float = 0.0  # sharpness-aware unlearning; 0 = off

    @property
    def name(self) -> str:
        lr = "paper" if self.learning_rate is None else f"{self.learning_rate:g}"
        retain = "" if self.retain_loss == "none" else f"+{self.retain_loss}"
        sam = f"+sam{self.sam_rho:g}" if self.sam_rho else ""
        return f"{self.method}{retain}{sam}@{lr}"


def grid(
    methods: list[str],
    learning_rates: list[float | None],
    retain_lr: float | None,
    sam_methods: list[str] | None = None,
    sam_rho: float = 0.05,
) -> list[BenchRun]:
    """Every method at every learning rate, and (at retain_lr) with the KL retain term,
    where the method has no retain term of its own (RMU's is part of it); then each of
    `sam_methods` with sharpness-aware unlearning at the same numeric learning rates, the
    rows to set beside its runs without it."""
    runs = [BenchRun(m, lr) for m in methods for lr in learning_rates]
    runs += [
        BenchRun(m, lr, sam_rho=sam_rho)
        for m in sam_methods or []
        for lr in learning_rates
        if lr is not None
    ]
    if retain_lr is not None:
        runs += [
            BenchRun(m, retain_lr, "kl")
            for m in methods
            if m in METHODS and not METHODS[m].own_retain_term
        ]
    return runs


def run_spec(base: dict[str, Any], run: BenchRun, demo_dir: Path) -> dict[str, Any]:
    """The base spec for `run`: its method and learning rate, the retain file where the
    run or the method needs one, FLAT's contrast file (the demo's non-answers)."""
    from core.demo.build import contrast_file

    spec = json.loads(json.dumps(base))
    spec["method"] = run.method
    method = METHODS[run.method]
    hyper = {k: v for k, v in spec["hyperparameters"].items() if k not in ("learning_rate", "beta")}
    if run.learning_rate is not None:
        hyper["learning_rate"] = run.learning_rate
    if run.retain_loss != "none":
        hyper["retain_loss"] = run.retain_loss
    if run.sam_rho:
        hyper["sam_rho"] = run.sam_rho
    if run.retain_loss != "none" or method.needs_retain:
        spec["retain_file"] = str(demo_dir / "data" / "retain_qa.jsonl")
    if method.uses_contrast:
        spec["contrast_file"] = str(contrast_file(demo_dir))
    spec["hyperparameters"] = hyper
    return spec


def data_needed(run: BenchRun) -> str:
    """What the run trains on, as the paper's Table 1 says it: forget, + retain, + contrast."""
    data = METHODS[run.method].data
    return data + " + retain" if run.retain_loss != "none" else data


def row(run: BenchRun, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    after, before = metrics["after"], metrics["before"]
    stop = metrics.get("stop_rule") or {}
    return {
        "run": run.name,
        "method": run.method,
        "retain_loss": run.retain_loss,
        "sam_rho": run.sam_rho,
        "data": data_needed(run),
        "learning_rate": metrics["hyperparameters"]["learning_rate"],
        "forget_f1": 100 * after["forget_knowmem"]["rouge_l_f1"],
        "forget_recall": 100 * after["forget_knowmem"]["rouge_l_recall"],
        "forget_mc": 100 * after["forget_mc"]["accuracy"] if "forget_mc" in after else None,
        "retain_f1": 100 * after["retain_knowmem"]["rouge_l_f1"],
        "retain_unwatched_f1": (
            100 * after["retain_knowmem_unwatched"]["rouge_l_f1"]
            if "retain_knowmem_unwatched" in after
            else None
        ),
        "general_mc": 100 * after["general_mc"]["accuracy"] if "general_mc" in after else None,
        "forget_f1_before": 100 * before["forget_knowmem"]["rouge_l_f1"],
        "retain_f1_before": 100 * before["retain_knowmem"]["rouge_l_f1"],
        **{k: metrics["tradeoff"][k] for k in ("delta_f", "delta_u", "delta_o")},
        **_evidence(metrics),
        "kept_step": (stop.get("best") or {}).get("step", metrics["steps"]["done"]),
        "steps_done": metrics["steps"]["done"],
        "stop_reason": stop.get("reason"),
        "seconds": round(seconds, 1),
    }


def _evidence(metrics: dict[str, Any]) -> dict[str, Any]:
    """The robustness and privacy columns: relearning recovery, forget KnowMem F1 at 4
    bits, and the Min-K%++ AUC of the forget set against the holdout (None where off)."""
    robust = metrics.get("robustness") or {}
    int4 = ((robust.get("quantization") or {}).get("levels") or {}).get("int4") or {}
    privacy = (metrics.get("privacy") or {}).get("after") or {}
    return {
        "relearn_recovery": (robust.get("relearn") or {}).get("recovery"),
        "forget_f1_4bit": 100 * int4["forget_knowmem"]["rouge_l_f1"]
        if "forget_knowmem" in int4
        else None,
        "mia_auc": privacy.get("min_k_plus_plus_auc"),
    }


def reference_attacks(raw: dict[str, Any], device: str | None) -> dict[str, Any]:
    """The robustness audits on the reference model, as on a job's output trained with
    full weights: the starting model's answers are its "before" and its own its "after",
    so its relearning recovery is the share of the forget answers that the attack's
    fine-tuning teaches a model that never saw them."""
    from core.engine.evaluation.evidence import attack_question_scores, robustness_audits
    from core.engine.modeling import AdapterSpec, load_base, pick_device, wrap
    from core.engine.spec import parse_spec

    spec = parse_spec(raw)
    assert spec.eval is not None and spec.eval.reference_model is not None
    where = pick_device(device)
    start, tokenizer = load_base(spec.base_model, where)
    before = attack_question_scores(start, tokenizer, spec.eval)
    del start
    reference, _ = load_base(spec.eval.reference_model, where)
    after = attack_question_scores(reference, tokenizer, spec.eval)
    return robustness_audits(
        wrap(reference, AdapterSpec(type="full"), need_reference=False),
        tokenizer,
        spec.eval,
        before_scores=before,
        after_scores=after,
        max_length=raw["hyperparameters"]["max_length"],
    )


def reference_row(
    metrics: dict[str, Any], attacks: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The reference model's figures (a model that never saw the forget set), as a row;
    with `attacks` (reference_attacks), its relearning recovery and 4-bit forget F1."""
    reference = metrics.get("reference")
    if not reference:
        return None
    privacy = (metrics.get("privacy") or {}).get("reference") or {}
    attacked = _evidence({"robustness": attacks or {}})
    return {
        "run": "reference model (never saw the forget set)",
        "data": "retrained without it",
        "learning_rate": None,
        "forget_f1": 100 * reference["forget_knowmem"]["rouge_l_f1"],
        "forget_recall": 100 * reference["forget_knowmem"]["rouge_l_recall"],
        "forget_mc": 100 * reference["forget_mc"]["accuracy"] if "forget_mc" in reference else None,
        "retain_f1": 100 * reference["retain_knowmem"]["rouge_l_f1"],
        "retain_unwatched_f1": (
            100 * reference["retain_knowmem_unwatched"]["rouge_l_f1"]
            if "retain_knowmem_unwatched" in reference
            else None
        ),
        "general_mc": 100 * reference["general_mc"]["accuracy"]
        if "general_mc" in reference
        else None,
        "delta_f": None,
        "delta_u": None,
        "delta_o": None,
        "relearn_recovery": attacked["relearn_recovery"],
        "forget_f1_4bit": attacked["forget_f1_4bit"],
        "mia_auc": privacy.get("min_k_plus_plus_auc"),
        "kept_step": None,
        "steps_done": None,
        "seconds": None,
    }


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown(rows: list[dict[str, Any]], settings: str) -> str:
    lines = [
        f"Settings: {settings}",
        "",
        "| run | data | lr | forget KnowMem F1 | recall | forget MC | retain KnowMem F1 "
        "| unwatched retain F1 | general MC | df | du | dO | relearn recovery "
        "| forget F1 at 4 bits | MIA AUC | kept step | time s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lr = "" if r["learning_rate"] is None else f"{r['learning_rate']:g}"
        kept = "" if r["kept_step"] is None else f"{r['kept_step']}/{r['steps_done']}"
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        recovery = "n/a" if r.get("relearn_recovery") is None else f"{r['relearn_recovery']:.2f}"
        auc = "n/a" if r.get("mia_auc") is None else f"{r['mia_auc']:.3f}"
        lines.append(
            f"| {r['run']} | {r.get('data', '')} | {lr} | {_points(r['forget_f1'])} | {_points(r['forget_recall'])} "
            f"| {_points(r['forget_mc'])} | {_points(r['retain_f1'])} | {_points(r['retain_unwatched_f1'])} "
            f"| {_points(r['general_mc'])} | {_points(r['delta_f'])} "
            f"| {_points(r['delta_u'])} | {_points(r['delta_o'])} | {recovery} "
            f"| {_points(r.get('forget_f1_4bit'))} | {auc} | {kept} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Paper Fig. 3: x = forget drop (-df, points), y = utility change (du, points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    methods = sorted({r["method"] for r in rows})
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    for r in rows:
        marker = "s" if r["retain_loss"] != "none" else "^" if r.get("sam_rho") else "o"
        ax.scatter(-r["delta_f"], r["delta_u"], color=colours[r["method"]], marker=marker, s=50)
        ax.annotate(
            r["run"],
            (-r["delta_f"], r["delta_u"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    for method in methods:
        ax.scatter([], [], color=colours[method], label=method)
    ax.legend(fontsize=8, loc="lower left")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("forget drop -df (points, higher = more forgotten)")
    ax.set_ylabel("utility change du (points, higher = better kept)")
    ax.set_title("Trade-off on the demo (circles: no retain data; triangles: +SAM; squares: +KL)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(
    demo_dir: Path,
    out_dir: Path,
    base: dict[str, Any],
    runs: list[BenchRun],
    device: str | None = None,
    echo: Any = print,
) -> list[dict[str, Any]]:
    from core.demo.build import DEMO_NON_ANSWER
    from core.engine.pipeline import run_job
    from core.engine.spec import parse_spec

    for run in runs:
        if run.method not in METHODS:
            raise ValueError(f"unknown method {run.method!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    reference = None
    for index, run in enumerate(runs, 1):
        raw = run_spec(base, run, demo_dir)
        if index > 1:  # the reference model is measured once, with the first run
            raw["eval"].pop("reference_model", None)
        spec = parse_spec(raw)
        started = time.monotonic()
        result = run_job(spec, out_dir / "runs" / run.name, device=device)
        rows.append(row(run, result.metrics, time.monotonic() - started))
        if index == 1 and raw["eval"].get("reference_model"):
            reference = reference_row(result.metrics, reference_attacks(raw, device))
        r = rows[-1]
        echo(
            f"[{index}/{len(runs)}] {run.name}: forget F1 {r['forget_f1']:.1f} (recall {r['forget_recall']:.1f}), "
            f"retain F1 {r['retain_f1']:.1f} (unwatched {_points(r['retain_unwatched_f1'])}), dO {r['delta_o']:.1f}, kept step {r['kept_step']}, "
            f"{r['seconds']:.0f} s"
        )
        (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    hyper = base["hyperparameters"]
    eos = "EOS counted as a forget target" if hyper.get("forget_eos") else "EOS not a forget target"
    settings = (
        f"full weights, max_steps {hyper['max_steps']}, batch {hyper['batch_size']}, {eos}, stop rule every "
        f"{base['eval']['probe_every']} steps with a {base['eval']['utility_budget']:.0%} utility budget "
        f"and a forget target of {base['eval']['forget_target']:.0%} of before "
        f"(the best state within it is kept; it watches the first "
        f"{base['eval']['probe_samples']} questions of each QA set, 'unwatched' = the next retain "
        f"questions), eval on {base['eval']['max_samples']} samples per set; "
        "lr 'paper' = the method's default (A.4.4; RMU: the official implementation's); "
        "+kl = KL to the initial model on retain QA; flat's contrast = the demo's non-answer "
        f"{DEMO_NON_ANSWER!r} to each forget prompt (its vocabulary has no words of refusal); "
        "+samR = sharpness-aware unlearning with radius R (one more forward and backward of "
        "the forget loss per step); "
        "rmu/rmu_star at the official defaults (steered layer at 7/32 of the depth, "
        "steering coefficient 20, alpha 100), their retain data the retain QA"
    )
    (out_dir / "results.md").write_text(
        markdown(rows + ([reference] if reference else []), settings)
    )
    plot(rows, out_dir / "tradeoff.png")
    return rows
