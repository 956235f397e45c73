"""Metrics pinned on hand-made cases; the stop rule stops and restores; a run that forgets."""

from __future__ import annotations

import json

import pytest
import torch

from core.engine.data import load_records
from core.engine.evaluation import knowmem, mc_accuracy, rouge_l, tradeoff
from core.engine.modeling import load_base
from core.engine.pipeline import run_job
from core.engine.spec import parse_spec

CPU = torch.device("cpu")


def test_rouge_l_known_strings():
    """LCS('the cat sat', 'the cat sat on the mat') = 3: P = 1, R = 3/6, F1 = 2/3."""
    f1, recall = rouge_l("the cat sat", "the cat sat on the mat")
    assert recall == pytest.approx(0.5) and f1 == pytest.approx(2 / 3)
    assert rouge_l("azure.", " azure.") == (1.0, 1.0)  # punctuation and spaces ignored
    assert rouge_l("crimson", "azure") == (0.0, 0.0)


def test_knowmem_on_fixture_model(fixture_dir):
    model, tok = load_base(fixture_dir / "model", CPU)
    records = load_records(fixture_dir / "data" / "forget_qa.jsonl").items[:20]
    right = knowmem(model, tok, records, batch_size=7)  # odd batch: left padding must not matter
    assert right["rouge_l_f1"] == pytest.approx(1.0) and right["n"] == 20
    swapped = [{"prompt": r["prompt"], "response": " nothing at all."} for r in records]
    assert knowmem(model, tok, swapped)["rouge_l_f1"] == pytest.approx(0.0)


def test_mc_accuracy_through_lm_eval_offline(fixture_dir, tmp_path):
    """The fixture model answers every MC question right; pointing half the answer keys at
    a wrong choice must give exactly 50% through lm-eval-harness."""
    model, tok = load_base(fixture_dir / "model", CPU)
    records = load_records(fixture_dir / "data" / "general_mc.jsonl").items[:20]
    for i, r in enumerate(records):
        if i % 2:
            r["answer"] = (r["answer"] + 1) % len(r["choices"])
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = mc_accuracy(model, tok, path)
    assert result == {"accuracy": 0.5, "n": 20, "per_item_correct": [True, False] * 10}


def test_an_evaluation_on_its_first_records_is_a_narrower_evaluation(fixture_dir, tmp_path):
    """`on_first(evaluate(30 records), 12)` gives what `evaluate(max_samples=12)` measures,
    metric by metric (the quantization audit's unquantized figures come so from the after
    evaluation). Every third answer key is wrong, and the last six, so the first 12 and
    all 30 differ."""
    from core.engine.evaluation import EvalSpec, evaluate, on_first, strip_per_record

    model, tok = load_base(fixture_dir / "model", CPU)
    data = fixture_dir / "data"
    files = {}
    for name in ("forget_qa", "retain_qa", "forget_text", "retain_text", "forget_mc", "general_mc"):
        records = load_records(data / f"{name}.jsonl").items[:30]
        for i, r in enumerate(records):
            wrong = i % 3 == 1 or i >= 24
            if wrong and "response" in r:
                r["response"] = " nothing at all."
            if wrong and "answer" in r:
                r["answer"] = (r["answer"] + 1) % len(r["choices"])
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = EvalSpec(**{name: str(path) for name, path in files.items()})
    wide = evaluate(model, tok, spec, max_samples=30)
    narrow = strip_per_record(evaluate(model, tok, spec, max_samples=12))
    narrow.pop("settings")
    narrow["forget_knowmem"].pop("samples")  # answers kept for the report, not figures
    narrow["retain_knowmem"].pop("samples")
    derived = on_first(wide, 12)
    assert derived is not None and set(derived) == set(narrow)
    for name, figures in narrow.items():
        assert set(derived[name]) == set(figures), name
        for field, value in figures.items():
            assert derived[name][field] == pytest.approx(value, rel=1e-5), (name, field)
    assert derived["forget_knowmem"]["rouge_l_f1"] != pytest.approx(
        wide["forget_knowmem"]["rouge_l_f1"]
    )
    assert derived["general_mc"] == {"accuracy": pytest.approx(8 / 12), "n": 12}
    assert on_first(strip_per_record(wide), 12) is None  # no per-record values: measure


def test_tradeoff_points():
    before = {"forget_knowmem": {"rouge_l_f1": 0.9}, "retain_knowmem": {"rouge_l_f1": 0.8}}
    after = {"forget_knowmem": {"rouge_l_f1": 0.2}, "retain_knowmem": {"rouge_l_f1": 0.75}}
    t = tradeoff(before, after)
    assert t["delta_f"] == pytest.approx(-70) and t["delta_u"] == pytest.approx(-5)
    assert t["delta_o"] == pytest.approx(65)


def _spec(fixture_dir, probe_every=2, **hp):
    data = fixture_dir / "data"
    return parse_spec(
        {
            "method": "catnip",
            "base_model": str(fixture_dir / "model"),
            "forget_file": str(data / "forget_qa.jsonl"),
            "adapter": {"type": "full"},
            "hyperparameters": {"max_steps": 40, "batch_size": 16, "max_length": 64, **hp},
            "eval": {
                "forget_qa": str(data / "forget_qa.jsonl"),
                "retain_qa": str(data / "retain_qa.jsonl"),
                "retain_text": str(data / "retain_text.jsonl"),
                "probe_every": probe_every,
                "utility_budget": 0.1,
                "forget_target": 0.0,
            },
        }
    )


def test_stop_rule_stops_and_restores(fixture_dir, tmp_path):
    """At a learning rate that collapses the tiny model, the rule stops before 40 steps,
    restores the best probed state within budget, and the final utility is within it."""
    result = run_job(_spec(fixture_dir, learning_rate=1e-3), tmp_path, device="cpu")
    stop = result.metrics["stop_rule"]
    assert stop["stopped_early"] and "utility" in stop["reason"]
    assert result.loop.steps_done < 40
    assert 0 < stop["restored_step"] < result.loop.steps_done
    before_u = result.metrics["before"]["retain_knowmem"]["rouge_l_f1"]
    after_u = result.metrics["after"]["retain_knowmem"]["rouge_l_f1"]
    assert after_u >= 0.9 * before_u
    assert (tmp_path / "report" / "summary.md").is_file()
    assert (tmp_path / "report" / "token_probabilities.png").is_file()


def test_first_probe_over_budget_keeps_the_initial_model(fixture_dir, tmp_path):
    result = run_job(_spec(fixture_dir, learning_rate=5e-2), tmp_path, device="cpu")
    assert result.metrics["stop_rule"]["restored_step"] == 0
    t = result.metrics["tradeoff"]
    assert t["forget_after"] == t["forget_before"] and t["utility_after"] == t["utility_before"]


def test_catnip_really_forgets_without_retain_data(fixture_dir, tmp_path):
    result = run_job(_spec(fixture_dir, learning_rate=1e-3, probe_every=1), tmp_path, device="cpu")
    t = result.metrics["tradeoff"]
    assert t["forget_after"] <= 0.6 * t["forget_before"]  # >= 40% relative drop on the fixture
    assert t["utility_after"] >= 0.9 * t["utility_before"]
    view = json.loads((tmp_path / "report" / "token_probabilities.json").read_text())

    def mean(rows: list[dict]) -> float:
        return sum(sum(r["probabilities"]) / len(r["probabilities"]) for r in rows) / len(rows)

    assert mean(view["after"]) < mean(view["before"])
