"""The relearning attack as a sweep: its cells from the spec (presets, a grid, cells of
its own, the single-setting fields), the worst cell's recovery as the audit's, and, on
the fixture, a shallow unlearning that the mildest cell passes and the sweep fails."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from core.engine.evaluation import robustness
from core.engine.evaluation.attacks.relearn import worst_cell
from core.engine.evaluation.evidence import judge
from core.engine.spec.parts import CriteriaSpec, RelearnSpec


def test_the_default_is_the_standard_sweep_and_the_old_fields_give_one_cell():
    cells = RelearnSpec().sweep()
    assert len(cells) == 12  # lr 1e-5, 1e-4, 1e-3 x 20, 60 steps x QA, text
    assert {c.learning_rate for c in cells} == {1e-5, 1e-4, 1e-3}
    assert {c.steps for c in cells} == {20, 60} and {c.data for c in cells} == {"qa", "text"}
    assert [c.name for c in RelearnSpec(preset="quick").sweep()] == [
        "qa, lr 1e-05, 20 steps",
        "qa, lr 0.001, 20 steps",
    ]
    assert len(RelearnSpec(preset="full").sweep()) == 7 * 3 * 2
    # the single-setting fields of earlier specs: one QA cell
    assert [c.name for c in RelearnSpec(steps=20, learning_rate=1e-4).sweep()] == [
        "qa, lr 0.0001, 20 steps"
    ]
    assert [c.name for c in RelearnSpec(learning_rate=1e-3).sweep()] == ["qa, lr 0.001, 20 steps"]
    grid = RelearnSpec(grid={"learning_rates": [1e-4, 1e-2], "steps": [5], "data": ["text"]})
    assert [c.name for c in grid.sweep()] == ["text, lr 0.0001, 5 steps", "text, lr 0.01, 5 steps"]
    own = RelearnSpec(cells=[{"learning_rate": 3e-4, "steps": 7}])
    assert [c.name for c in own.sweep()] == ["qa, lr 0.0003, 7 steps"]
    # a stored spec read again keeps its sweep
    assert RelearnSpec.model_validate(RelearnSpec().model_dump()).sweep() == cells


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"steps": 20, "cells": [{"learning_rate": 1e-4, "steps": 5}]}, "cells"),
        ({"grid": {"learning_rates": [], "steps": [5]}}, "learning_rates"),
        ({"cells": [{"learning_rate": 0, "steps": 5}]}, "learning_rate"),
        ({"cells": [{"learning_rate": 1e-4, "steps": 5, "data": "chat"}]}, "data"),
        ({"preset": "huge"}, "preset"),
    ],
)
def test_a_bad_sweep_is_refused_naming_its_field(bad, field):
    with pytest.raises(ValidationError) as error:
        RelearnSpec.model_validate(bad)
    assert field in str(error.value)


def test_the_worst_cell_is_the_highest_recovery_and_the_criterion_reads_it():
    rows = [
        {"cell": "a", "status": "done", "recovery": 0.1, "forget_knowmem_f1": 0.3},
        {"cell": "b", "status": "done", "recovery": 0.7, "forget_knowmem_f1": 0.2},
        {"cell": "c", "status": "off", "reason": "needs eval.forget_text"},
    ]
    assert worst_cell(rows)["cell"] == "b"
    nothing_removed = [{**row, "recovery": None} for row in rows[:2]]
    assert worst_cell(nothing_removed)["cell"] == "a"  # then the highest after-attack score
    assert worst_cell(rows[2:]) is None
    metrics = {"robustness": {"relearn": {"recovery": 0.7}}}
    verdict, criteria = judge(CriteriaSpec(relearn_recovery_max=0.5), metrics)
    assert verdict == "fail" and criteria[0]["value"] == 0.7


def _shallow_job(fixture_dir, adapter, robustness):
    from core.engine.spec import parse_spec

    data = fixture_dir / "data"
    return parse_spec(
        {
            "method": "ga",
            "base_model": str(fixture_dir / "model"),
            "forget_file": str(data / "forget_qa.jsonl"),
            "adapter": adapter,
            "hyperparameters": {
                "learning_rate": 1e-3 if adapter["type"] == "full" else 1e-2,
                "max_steps": 4,
                "batch_size": 32,
                "max_length": 64,
            },
            "eval": {
                "forget_qa": str(data / "forget_qa.jsonl"),
                "retain_qa": str(data / "retain_qa.jsonl"),
                "forget_text": str(data / "forget_text.jsonl"),
                "forget_mc": str(data / "forget_mc.jsonl"),
                "reference_model": str(fixture_dir / "reference"),
                "criteria": {"relearn_recovery_max": 0.5},
                "robustness": {
                    **robustness,
                    "quantization": {"enabled": False},
                    "in_context": {"enabled": False},
                },
            },
        }
    )


def test_the_sweep_fails_a_shallow_unlearning_that_the_mildest_cell_passes(fixture_dir, tmp_path):
    """Four steps of gradient ascent on the fixture; the default sweep. At the lowest
    learning rate and the short budget the attack brings back little (recovery below
    0.2), its worst cell most of it (above 0.5): the audit's recovery is the worst cell's, and the verdict
    fails. The reference model went through the same cells, each beside the job's."""
    from core.engine.pipeline import run_job

    spec = _shallow_job(fixture_dir, {"type": "full"}, {})
    metrics = run_job(spec, tmp_path / "out", device="cpu").metrics
    relearn = metrics["robustness"]["relearn"]
    cells = {cell["cell"]: cell for cell in relearn["cells"]}
    assert len(cells) == 12 and all(cell["status"] == "done" for cell in cells.values())
    mildest = cells["qa, lr 1e-05, 20 steps"]  # the lowest rate, the short budget
    assert mildest["recovery"] < 0.2, mildest
    worst = cells[relearn["worst_cell"]]
    assert relearn["recovery"] == worst["recovery"] > 0.5, worst
    assert worst["recovery"] == max(c["recovery"] for c in cells.values())
    assert relearn["settings"]["learning_rate"] == worst["learning_rate"]
    row = next(r for r in metrics["criteria"] if r["criterion"] == "relearn_recovery_max")
    assert row["value"] == relearn["recovery"] and row["passed"] is False
    assert metrics["verdict"] == "fail"
    for cell in cells.values():  # every figure of each cell, the reference's beside it
        assert {"forget_knowmem_f1", "forget_verbmem_f1", "forget_mc_accuracy"} <= set(cell)
        assert set(cell["reference"]) == {
            "forget_knowmem_f1",
            "forget_verbmem_f1",
            "forget_mc_accuracy",
        }
    # what the attack teaches the never-trained reference stays below what it brings back
    assert worst["reference"]["forget_knowmem_f1"] < worst["forget_knowmem_f1"], worst
    assert relearn["reference_after"]["forget_knowmem_f1"] < 0.2
    assert json.loads(json.dumps(metrics))


def test_a_lora_job_is_attacked_on_its_merged_weights_and_left_as_found(fixture_dir):
    """The attack fine-tunes every weight of a merged copy: the job's LoRA model (base
    and adapter) is exactly as it was, and nothing of the copy stays trainable in it."""
    from core.engine.evaluation.evidence import attack_question_scores, robustness_audits
    from core.engine.modeling import AdapterSpec, load_base, wrap
    from core.engine.spec.parts import EvalSpec

    data = fixture_dir / "data"
    model, tokenizer = load_base(fixture_dir / "model", torch.device("cpu"))
    wrapped = wrap(model, AdapterSpec(type="lora", r=4), need_reference=False)
    with torch.no_grad():  # an adapter that changes the model
        for name, parameter in wrapped.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    spec = EvalSpec(
        forget_qa=str(data / "forget_qa.jsonl"),
        max_samples=40,
        robustness={
            "relearn": {"cells": [{"learning_rate": 1e-3, "steps": 3}]},
            "quantization": {"enabled": False},
            "in_context": {"enabled": False},
        },
    )
    state = {n: p.detach().clone() for n, p in wrapped.model.state_dict().items()}
    trainable = {n for n, p in wrapped.model.named_parameters() if p.requires_grad}
    copy = robustness.attacker_copy(wrapped.model)
    assert not any("lora" in name for name, _ in copy.named_parameters())
    assert all(p.requires_grad for p in copy.parameters())
    scores = attack_question_scores(wrapped.model, tokenizer, spec)
    result = robustness_audits(
        wrapped,
        tokenizer,
        spec,
        before_scores=[1.0] * len(scores),  # everything known before: something to recover
        after_scores=scores,
        max_length=64,
    )["relearn"]
    assert result["status"] == "done", result
    assert result["settings"]["trains"].startswith("every weight")
    assert result["cells"][0]["loss"] > 0
    after = wrapped.model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[n], state[n]) for n in state)
    assert {n for n, p in wrapped.model.named_parameters() if p.requires_grad} == trainable


def test_the_certificate_record_names_every_cell_of_the_sweep():
    from core.service.certificates import audits

    relearn = {
        "status": "done",
        "settings": {"steps": 60, "learning_rate": 1e-4},
        "worst_cell": "qa, lr 0.0001, 60 steps",
        "cells": [
            {
                "cell": "qa, lr 0.0001, 60 steps",
                "data": "qa",
                "learning_rate": 1e-4,
                "steps": 60,
                "status": "done",
                "recovery": 0.88,
                "forget_knowmem_f1": 0.9,
            },
            {
                "cell": "text, lr 0.0001, 60 steps",
                "data": "text",
                "learning_rate": 1e-4,
                "steps": 60,
                "status": "off",
                "reason": "needs eval.forget_text with 2 texts",
            },
        ],
    }
    rows = audits({"eval": {}}, {"robustness": {"relearn": relearn}})
    row = next(r for r in rows if r["audit"] == "robustness.relearn")
    assert row["worst_cell"] == "qa, lr 0.0001, 60 steps"
    assert [c["cell"] for c in row["cells"]] == [c["cell"] for c in relearn["cells"]]
    assert row["cells"][0]["recovery"] == 0.88 and "forget_knowmem_f1" not in row["cells"][0]
    assert row["cells"][1]["reason"].startswith("needs eval.forget_text")
