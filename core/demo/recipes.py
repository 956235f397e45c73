"""`unlearn bench --recipes`: robust and selective forgetting, recipe by recipe, on the demo.

A recipe is the demo job (CATNIP, full weights, the stop rule at the demo's budget) with
some of: a KL retain term on out-of-domain retain data (the demo's cities) or on
in-domain retain data (the cities and half of the neighbour dragons), selective updates,
the attack in the loop, and the distillation stage after unlearning. Every recipe's
settings are fixed here, before any run; every run goes through the same evidence (the
job's relearning sweep, 4-bit quantization, membership inference) and is measured on
the same held-out neighbours: the neighbour dragons that no recipe trains on.

Each run is a child process (`python -m core.demo.recipes`), so its peak resident memory is its own.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The robust profile's recipe (core.engine.spec.profiles) is one of these rows.
RECIPES: dict[str, dict[str, Any]] = {
    "catnip": {},
    "catnip+kl": {"retain": "out_of_domain"},
    "catnip+kl:domain": {"retain": "in_domain"},
    "catnip+kl:domain+selective": {"retain": "in_domain", "selective": {"mode": "project"}},
    "catnip+kl:domain+mask": {"retain": "in_domain", "selective": {"mode": "mask"}},
    "catnip+kl:domain+attack": {
        "retain": "in_domain",
        "attack_in_loop": {"every": 1, "lr": 1e-2, "steps": 1, "split": 0.2},
    },
    "catnip+distill": {"robustify": {}},
    "catnip+kl:domain+selective+distill": {
        "retain": "in_domain",
        "selective": {"mode": "project"},
        "robustify": {},
    },
    "catnip+kl:domain+selective+attack+distill": {
        "retain": "in_domain",
        "selective": {"mode": "project"},
        "attack_in_loop": {"every": 1, "lr": 1e-2, "steps": 1, "split": 0.2},
        "robustify": {},
    },
}

# The distillation stage of every recipe that has one: UNDO's alpha, at the rate and
# batch the demo model was trained with (it is a tiny model trained from scratch), the
# student probed every 50 steps until its utility is back within the job's budget.
DISTILL = {
    "alpha": 0.6,
    "steps": 1000,
    "learning_rate": 3e-3,
    "batch_size": 32,
    "probe_every": 50,
    "seed": 0,
}


@dataclass(frozen=True)
class BenchData:
    """The files the recipes share, written once beside the demo's data."""

    retain_in_domain: Path  # the cities' QA and the first half of the neighbours' QA
    neighbors_held_out: Path  # the other half: what every recipe is measured on
    distill: Path  # the cities' text and QA, the first half of the neighbours'
    neighbors_trained: list[str] = field(default_factory=list)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    partial.replace(path)


def bench_data(demo_dir: Path, out_dir: Path) -> BenchData:
    """Split the demo's neighbour dragons by name, in their file's order: the first half
    may be retain and distillation data, the second half is held out for every recipe."""
    data = demo_dir / "data"
    neighbor_qa = _jsonl(data / "neighbor_qa.jsonl")
    names = list(dict.fromkeys(r["fact"].split("/")[0] for r in neighbor_qa))
    trained = set(names[: len(names) // 2])
    qa_in = [r for r in neighbor_qa if r["fact"].split("/")[0] in trained]
    qa_out = [r for r in neighbor_qa if r["fact"].split("/")[0] not in trained]
    text_in = [
        r for r in _jsonl(data / "neighbor_text.jsonl") if r["text"].split(" ", 1)[0] in trained
    ]
    retain_qa = _jsonl(data / "retain_qa.jsonl")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = BenchData(
        retain_in_domain=out_dir / "retain_in_domain_qa.jsonl",
        neighbors_held_out=out_dir / "neighbor_held_out_qa.jsonl",
        distill=out_dir / "distill_text.jsonl",
        neighbors_trained=sorted(trained),
    )
    _write(files.retain_in_domain, retain_qa + qa_in)
    _write(files.neighbors_held_out, qa_out)
    texts = _jsonl(data / "retain_text.jsonl") + text_in
    texts += [{"text": r["prompt"] + r["response"]} for r in retain_qa + qa_in]
    _write(files.distill, texts)
    return files


def recipe_spec(
    base: dict[str, Any], recipe: dict[str, Any], demo_dir: Path, files: BenchData
) -> dict[str, Any]:
    """The demo spec with the recipe's parts; the held-out neighbours as eval.neighbor_qa."""
    spec = json.loads(json.dumps(base))
    spec["eval"]["neighbor_qa"] = str(files.neighbors_held_out)
    hyper = spec["hyperparameters"]
    retain = recipe.get("retain")
    if retain is not None:
        hyper["retain_loss"] = "kl"
        spec["retain_file"] = str(
            files.retain_in_domain
            if retain == "in_domain"
            else demo_dir / "data" / "retain_qa.jsonl"
        )
    for option in ("selective", "attack_in_loop"):
        if option in recipe:
            hyper[option] = dict(recipe[option])
    if "robustify" in recipe:
        spec["robustify"] = {**DISTILL, **recipe["robustify"]}
        spec["distill_file"] = str(files.distill)
    return spec


def _child(spec_path: Path, output_dir: Path, device: str | None) -> None:
    """One recipe's job in this (fresh) process: writes outcome.json beside its spec,
    with the job's metrics, its seconds and the process's peak RSS."""
    from core.engine.pipeline import run_job
    from core.engine.spec import parse_spec

    raw = json.loads(spec_path.read_text())
    started = time.monotonic()
    try:
        result = run_job(parse_spec(raw), output_dir, device=device)
        outcome: dict[str, Any] = {
            "metrics": result.metrics,
            "seconds": time.monotonic() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    except Exception as exc:  # reported as the recipe's row, not a crashed bench
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    (spec_path.parent / "outcome.json").write_text(json.dumps(outcome))


def run_one(raw: dict[str, Any], output_dir: Path, device: str | None) -> dict[str, Any]:
    """Run `raw` as `python -m core.demo.recipes SPEC OUTPUT [DEVICE]` and read its outcome."""
    work = output_dir.parent / f"{output_dir.name}.run"
    work.mkdir(parents=True, exist_ok=True)
    (work / "outcome.json").unlink(missing_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(raw))
    command = [sys.executable, "-m", "core.demo.recipes", str(spec_path), str(output_dir)]
    done = subprocess.run(command + ([device] if device else []), check=False)
    if not (work / "outcome.json").is_file():
        return {"error": f"the recipe's process exited {done.returncode} without an outcome"}
    return dict(json.loads((work / "outcome.json").read_text()))


def _pct(value: Any) -> float | None:
    return None if value is None else 100 * float(value)


def _cells(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return list(((metrics.get("robustness") or {}).get("relearn") or {}).get("cells") or [])


def reference_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The reference model's row, from the first run (the one that kept reference_model):
    its evaluation, and its forget KnowMem F1 at the worst of the sweep's cells for it."""
    reference = metrics.get("reference") or {}
    cells = [c["reference"] for c in _cells(metrics) if c.get("reference")]
    privacy = (metrics.get("privacy") or {}).get("reference") or {}
    return {
        "recipe": "reference model (never saw the forget set)",
        "forget_knowmem": _pct((reference.get("forget_knowmem") or {}).get("rouge_l_f1")),
        "forget_verbmem": _pct((reference.get("forget_verbmem") or {}).get("rouge_l_f1")),
        "forget_mc": _pct((reference.get("forget_mc") or {}).get("accuracy")),
        "neighbors": _pct((reference.get("neighbor_knowmem") or {}).get("rouge_l_f1")),
        "utility": _pct((reference.get("retain_knowmem") or {}).get("rouge_l_f1")),
        "general_mc": _pct((reference.get("general_mc") or {}).get("accuracy")),
        "worst_attack_knowmem": _pct(max((c["forget_knowmem_f1"] for c in cells), default=None)),
        "mia_auc": privacy.get("min_k_plus_plus_auc"),
    }


def recipe_row(name: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """One recipe's figures (points, 0-100) from its job's metrics."""
    if "error" in outcome:
        return {"recipe": name, "error": outcome["error"]}
    metrics = outcome["metrics"]
    before, after = metrics["before"], metrics["after"]
    robust = metrics.get("robustness") or {}
    relearn = robust.get("relearn") or {}
    int4 = ((robust.get("quantization") or {}).get("levels") or {}).get("int4") or {}
    done = [c for c in _cells(metrics) if c.get("status") == "done"]
    robustify = metrics.get("robustify") or {}
    return {
        "recipe": name,
        "forget_knowmem": _pct(after["forget_knowmem"]["rouge_l_f1"]),
        "forget_verbmem": _pct((after.get("forget_verbmem") or {}).get("rouge_l_f1")),
        "forget_mc": _pct((after.get("forget_mc") or {}).get("accuracy")),
        "neighbors": _pct((after.get("neighbor_knowmem") or {}).get("rouge_l_f1")),
        "neighbors_before": _pct((before.get("neighbor_knowmem") or {}).get("rouge_l_f1")),
        "utility": _pct(after["retain_knowmem"]["rouge_l_f1"]),
        "utility_before": _pct(before["retain_knowmem"]["rouge_l_f1"]),
        "general_mc": _pct((after.get("general_mc") or {}).get("accuracy")),
        "worst_cell": relearn.get("worst_cell"),
        "recovery": relearn.get("recovery"),
        "worst_attack_knowmem": _pct(max((c["forget_knowmem_f1"] for c in done), default=None)),
        "forget_knowmem_4bit": _pct((int4.get("forget_knowmem") or {}).get("rouge_l_f1")),
        "mia_auc": ((metrics.get("privacy") or {}).get("after") or {}).get("min_k_plus_plus_auc"),
        "unlearn_steps": metrics["steps"]["done"],
        "distill_steps": (robustify.get("steps") or {}).get("done"),
        "verdict": metrics.get("verdict"),
        "seconds": round(outcome["seconds"], 1),
        "stage_seconds": metrics.get("timings_s"),
        "peak_rss_mb": round(outcome["peak_rss_mb"]),
    }


def _f(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], reference: dict[str, Any] | None, notes: str) -> str:
    """The table: one row per recipe, the reference last; time against the plain job's."""
    plain = next((r["seconds"] for r in rows if r["recipe"] == "catnip" and "seconds" in r), None)
    lines = [
        notes,
        "",
        "| recipe | forget KnowMem | VerbMem | MC | neighbours (before) | utility (before) "
        "| general MC | worst relearn cell: forget KnowMem (recovery) | at 4 bits | MIA AUC "
        "| steps (distil) | verdict | time s (x plain) | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | error: {r['error']} |" + " |" * 13)
            continue
        ratio = f" ({r['seconds'] / plain:.1f}x)" if plain else ""
        distil = f" ({r['distill_steps']})" if r["distill_steps"] is not None else ""
        lines.append(
            f"| {r['recipe']} | {_f(r['forget_knowmem'])} | {_f(r['forget_verbmem'])} "
            f"| {_f(r['forget_mc'])} | {_f(r['neighbors'])} ({_f(r['neighbors_before'])}) "
            f"| {_f(r['utility'])} ({_f(r['utility_before'])}) | {_f(r['general_mc'])} "
            f"| {_f(r['worst_attack_knowmem'])} ({_f(r['recovery'], 2)}) "
            f"| {_f(r['forget_knowmem_4bit'])} | {_f(r['mia_auc'], 3)} "
            f"| {r['unlearn_steps']}{distil} | {r['verdict']} | {r['seconds']:.0f}{ratio} "
            f"| {r['peak_rss_mb']} |"
        )
    if reference is not None:
        lines.append(
            f"| {reference['recipe']} | {_f(reference['forget_knowmem'])} "
            f"| {_f(reference['forget_verbmem'])} | {_f(reference['forget_mc'])} "
            f"| {_f(reference['neighbors'])} | {_f(reference['utility'])} "
            f"| {_f(reference['general_mc'])} | {_f(reference['worst_attack_knowmem'])} "
            f"| | {_f(reference['mia_auc'], 3)} | | | | |"
        )
    return "\n".join(lines) + "\n"


def run_recipes(
    demo_dir: Path,
    out_dir: Path,
    base: dict[str, Any],
    names: list[str],
    device: str | None = None,
    echo: Any = print,
) -> list[dict[str, Any]]:
    """Run each named recipe on the demo (the reference model evaluated and attacked with
    the first); write results.json and results.md under out_dir."""
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    files = bench_data(demo_dir, out_dir)
    rows: list[dict[str, Any]] = []
    reference = None
    for index, name in enumerate(names, 1):
        raw = recipe_spec(base, RECIPES[name], demo_dir, files)
        if index > 1:
            raw["eval"].pop("reference_model", None)
        outcome = run_one(raw, out_dir / "runs" / name.replace(":", "_"), device)
        rows.append(recipe_row(name, outcome))
        if index == 1 and "metrics" in outcome and raw["eval"].get("reference_model"):
            reference = reference_figures(outcome["metrics"])
        r = rows[-1]
        echo(
            f"[{index}/{len(names)}] {name}: "
            + (
                r["error"]
                if "error" in r
                else f"forget KnowMem {_f(r['forget_knowmem'])}, neighbours "
                f"{_f(r['neighbors'])}, utility {_f(r['utility'])}, worst cell "
                f"{_f(r['worst_attack_knowmem'])}, {r['seconds']:.0f} s"
            )
        )
        (out_dir / "results.json").write_text(
            json.dumps({"rows": rows, "reference": reference}, indent=2)
        )
    notes = (
        "The demo job (CATNIP, full weights, lr 3e-4, batch 128, max_steps "
        f"{base['hyperparameters']['max_steps']}, the stop rule at a "
        f"{base['eval']['utility_budget']:.0%} utility budget) with each recipe's parts; "
        "kl = a KL retain term on the cities' QA (out of domain) or, with :domain, on them "
        f"and the QA of {len(files.neighbors_trained)} neighbour dragons; neighbours = the "
        "other neighbour dragons' QA, which no recipe trains on; selective = projection "
        "of 8 retain directions, mask = sign agreement; attack = attack in the loop every "
        "step (one SGD step at 1e-2 on a fifth of the forget set); distill = "
        f"alpha {DISTILL['alpha']}, at most {DISTILL['steps']} steps at "
        f"{DISTILL['learning_rate']:g}, batch {DISTILL['batch_size']}, on the cities' text "
        "and QA and the trained neighbours' text and QA, stopping once utility is back "
        "within budget; every figure in points; the relearning sweep's worst cell is the "
        "highest forget KnowMem F1 after any cell's attack."
    )
    (out_dir / "results.md").write_text(markdown(rows, reference, notes))
    return rows


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
