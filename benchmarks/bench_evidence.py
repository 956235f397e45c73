"""What the evidence costs: the demo job (`unlearn demo`'s spec, run in-process with
`core.engine.pipeline.run_job`) and a longer one (the same spec, 200 steps, the stop
rule off), with their timings per stage, and each audit's time against the unlearning
stage's (the stop rule's probes included, as the job runs it). The relearning sweep is
the spec's default preset unless --preset names another; its run on the reference model
is counted apart.

    .venv/bin/python benchmarks/bench_evidence.py [--demo-dir .unlearn/demo] [--out FILE]
        [--jobs demo,long] [--preset quick|standard|full] [--device cpu]

The demo model (and its reference model) is built first where it is not there yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LONG_STEPS = 200


def _spec(demo_dir: Path, job: str, preset: str | None) -> dict[str, Any]:
    """The demo job, or the longer one: 200 steps, no stop rule (no forget target, no
    probes), the relearning sweep at `preset` where one is named."""
    from core.demo.build import demo_spec

    if job == "demo":
        spec = demo_spec(demo_dir)
    else:
        spec = demo_spec(demo_dir, max_steps=LONG_STEPS)
        for key in ("forget_target", "probe_every", "probe_samples", "utility_budget"):
            spec["eval"].pop(key, None)
    if preset is not None:
        spec["eval"].setdefault("robustness", {})["relearn"] = {"preset": preset}
    return spec


def _rows(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each audit's seconds against the unlearning stage's."""
    timings = metrics["timings_s"]
    robust = metrics["robustness"]
    relearn = robust["relearn"]
    parts = {
        f"relearning sweep ({len(relearn.get('cells', []))} cells)": relearn.get("seconds", 0.0),
        # the levels and the unquantized figures they are compared with
        "quantization (int8, int4)": robust["quantization"].get("seconds", 0.0),
        "in-context extraction": robust["in_context"].get("seconds", 0.0),
        "membership inference (before + after)": timings.get("privacy_before", 0.0)
        + timings["audit_privacy"],
    }
    unlearn = timings["unlearn"]
    audits = sum(parts.values())
    rows = [
        {"stage": name, "seconds": round(seconds, 2), "vs_unlearning": round(seconds / unlearn, 3)}
        for name, seconds in parts.items()
    ]
    rows.append(
        {
            "stage": "all audits",
            "seconds": round(audits, 2),
            "vs_unlearning": round(audits / unlearn, 3),
        }
    )
    reference = timings.get("audit_reference", 0.0)
    sweep = relearn.get("reference_seconds", 0.0)
    rows.append(
        {
            "stage": "reference model: its relearning sweep",
            "seconds": sweep,
            "vs_unlearning": round(sweep / unlearn, 3),
        }
    )
    rows.append(
        {
            "stage": "reference model: the rest (its evaluation and MIA)",
            "seconds": round(reference - sweep, 2),
            "vs_unlearning": round((reference - sweep) / unlearn, 3),
        }
    )
    return {
        "unlearning_stage_s": unlearn,
        "steps": metrics["steps"],
        "audits": rows,
        "relearn": {
            "worst_cell": relearn.get("worst_cell"),
            "recovery": relearn.get("recovery"),
            "cells": [
                {
                    key: cell.get(key)
                    for key in ("cell", "recovery", "forget_knowmem_f1", "reference")
                }
                for cell in relearn.get("cells", [])
            ],
        },
        "timings_s": timings,
        "verdict": metrics["verdict"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", type=Path, default=ROOT / ".unlearn" / "demo")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--jobs", default="demo,long", help="demo, long or both")
    parser.add_argument("--preset", choices=["quick", "standard", "full"], default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from core.demo.build import ensure_model
    from core.engine.pipeline import run_job
    from core.engine.runtime import quiet_libraries
    from core.engine.spec import parse_spec

    quiet_libraries()
    ensure_model(args.demo_dir, reference=True)
    report: dict[str, Any] = {}
    for job in args.jobs.split(","):
        with tempfile.TemporaryDirectory() as out:
            spec = parse_spec(_spec(args.demo_dir, job, args.preset))
            result = run_job(spec, Path(out), device=args.device)
        report[job] = _rows(result.metrics)
        print(json.dumps({job: report[job]["audits"]}, indent=2), flush=True)
        if args.out:  # after each job: a long run that is cut short keeps what it measured
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
