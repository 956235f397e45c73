"""A robust job end to end on the fixture through core.engine.pipeline: a LoRA job with
selective updates and the attack in the loop, then the distillation stage; its output is
full weights, the after evaluation and the audits measure the student."""

from __future__ import annotations

import pytest

from core.engine.events import Events, Phase
from core.engine.pipeline import run_job
from core.engine.spec import parse_spec
from core.errors import DataError


class _Phases(Events):
    def __init__(self) -> None:
        self.phases: list[str] = []
        self.probes: list[int] = []

    def phase(self, name: str, detail: str | None = None) -> None:
        self.phases.append(name)

    def probe(self, step: int, result: dict[str, float]) -> None:
        self.probes.append(step)


def _spec(fixture_dir, **over):
    data = fixture_dir / "data"
    return parse_spec(
        {
            "method": "catnip",
            "base_model": str(fixture_dir / "model"),
            "forget_file": str(data / "forget_qa.jsonl"),
            "retain_file": str(data / "retain_qa.jsonl"),
            "distill_file": str(data / "retain_text.jsonl"),
            "adapter": {"type": "lora", "r": 4},
            "hyperparameters": {
                "max_steps": 4,
                "batch_size": 8,
                "max_length": 64,
                "learning_rate": 1e-3,
                "retain_loss": "kl",
                "selective": {"mode": "both", "components": 4},
                "attack_in_loop": {"every": 2, "lr": 1e-3},
            },
            "robustify": {"alpha": 0.5, "steps": 20, "learning_rate": 1e-3, "probe_every": 10},
            "eval": {
                "forget_qa": str(data / "forget_qa.jsonl"),
                "retain_qa": str(data / "retain_qa.jsonl"),
                "probe_samples": 20,
                "utility_budget": 0.0,
            },
            **over,
        }
    )


def test_a_robust_lora_job_distils_into_full_weights(fixture_dir, tmp_path):
    events = _Phases()
    result = run_job(_spec(fixture_dir), tmp_path, device="cpu", events=events)
    metrics = result.metrics
    assert events.phases.index(Phase.UNLEARNING) < events.phases.index(Phase.DISTILLING)
    assert events.phases.index(Phase.DISTILLING) < events.phases.index(Phase.EVALUATING_AFTER)
    robust = metrics["robustify"]
    assert robust["output"] == "full weights" and robust["options"]["alpha"] == 0.5
    # the watch probes the teacher once and the student every 10 steps, until utility is
    # within budget 0 of the teacher's (or all 20 steps ran)
    assert robust["teacher_probe"] is not None
    assert 1 <= robust["steps"]["done"] <= 20 and [p["step"] for p in robust["probes"]] == [
        10.0 * (i + 1) for i in range(len(robust["probes"]))
    ]
    assert "model" in result.artifacts and "adapter" not in result.artifacts
    assert (tmp_path / "model" / "config.json").is_file()
    assert "distill" in metrics["timings_s"]
    assert "after" in metrics and "retain_knowmem" in metrics["after"]


def test_a_robust_job_whose_distill_set_repeats_the_forget_set_is_refused(fixture_dir, tmp_path):
    spec = _spec(fixture_dir, distill_file=str(fixture_dir / "data" / "forget_qa.jsonl"))
    with pytest.raises(DataError) as caught:
        run_job(spec, tmp_path, device="cpu")
    assert caught.value.param == "distill_file"
    assert "line 1 (forget_file line 1)" in caught.value.message
    assert not (tmp_path / "model").exists()
