"""What the evidence costs: the demo job (`unlearn demo`'s spec, run in-process with
`core.engine.pipeline.run_job`) with its timings per stage, and each audit's time against
the unlearning stage's (the stop rule's probes included, as the job runs it).

    .venv/bin/python benchmarks/bench_evidence.py [--demo-dir .unlearn/demo] [--out FILE]

The demo model (and its reference model) is built first where it is not there yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", type=Path, default=ROOT / ".unlearn" / "demo")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from core.demo.build import demo_spec, ensure_model
    from core.engine.pipeline import run_job
    from core.engine.runtime import quiet_libraries
    from core.engine.spec import parse_spec

    quiet_libraries()
    ensure_model(args.demo_dir, reference=True)
    with tempfile.TemporaryDirectory() as out:
        result = run_job(parse_spec(demo_spec(args.demo_dir)), Path(out), device="cpu")
    timings = result.metrics["timings_s"]
    robust = result.metrics["robustness"]
    parts = {
        "relearning attack": robust["relearn"].get("seconds", 0.0),
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
    rows.append(
        {
            "stage": "reference model (its full evaluation and MIA)",
            "seconds": timings.get("audit_reference", 0.0),
            "vs_unlearning": round(timings.get("audit_reference", 0.0) / unlearn, 3),
        }
    )
    report = {
        "unlearning_stage_s": unlearn,
        "timings_s": timings,
        "audits": rows,
        "steps": result.metrics["steps"],
        "verdict": result.metrics["verdict"],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
