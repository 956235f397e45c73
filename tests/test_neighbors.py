"""Neighbour knowledge (eval.neighbor_qa), every forget metric in the headline, and a
stop rule that targets any forget metric it can probe: on hand-made metrics and on the
fixture, where unlearning the whole domain must fail `neighbor_min_ratio`."""

from __future__ import annotations

import json

import pytest

from core.engine.evaluation.summary import forget_standing, headline, neighbor_line


def _metrics(before: dict, after: dict, reference: dict | None = None) -> dict:
    """Metrics with forget KnowMem, VerbMem and MC at the given (0-1) figures."""

    def figures(values: dict) -> dict:
        return {
            "forget_knowmem": {"rouge_l_f1": values["knowmem"]},
            "forget_verbmem": {"rouge_l_f1": values["verbmem"]},
            "forget_mc": {"accuracy": values["mc"]},
        }

    out = {"before": figures(before), "after": figures(after)}
    if reference is not None:
        out["reference"] = figures(reference)
    return out


def test_the_headline_names_the_forget_metric_with_the_most_knowledge_left():
    """KnowMem cut to a ninth while VerbMem keeps 96% of before: the headline leads with
    VerbMem, not KnowMem. Against a reference, MC at chance (0.25) counts as nothing left,
    and which metric is worst follows the distance to the reference, not to zero."""
    before = {"knowmem": 0.9, "verbmem": 0.99, "mc": 0.9}
    after = {"knowmem": 0.1, "verbmem": 0.95, "mc": 0.5}
    standing = forget_standing(_metrics(before, after))
    assert standing["worst"] == "forget_verbmem"
    rows = {row["metric"]: row for row in standing["metrics"]}
    assert rows["forget_knowmem"]["share_of_before"] == pytest.approx(0.1 / 0.9)
    assert rows["forget_verbmem"]["knowledge_left"] == pytest.approx(0.95 / 0.99)
    line = headline(_metrics(before, after))
    assert line.startswith("Most knowledge left: forget VerbMem F1 95.0 after, 99.0 before")
    assert "forget KnowMem F1 10.0 after" in line and "forget MC accuracy 50.0 after" in line

    # without a reference KnowMem (0.6 of before) is worse than MC (0.5 of before) ...
    before = {"knowmem": 1.0, "verbmem": 0.5, "mc": 1.0}
    after = {"knowmem": 0.6, "verbmem": 0.0, "mc": 0.5}
    assert forget_standing(_metrics(before, after))["worst"] == "forget_knowmem"
    # ... against a reference that answers half the KnowMem questions and MC at chance,
    # KnowMem keeps 0.2 of what it could lose, MC (0.5 - 0.25) / (1 - 0.25) = 0.33
    reference = {"knowmem": 0.5, "verbmem": 0.0, "mc": 0.25}
    standing = forget_standing(_metrics(before, after, reference))
    rows = {row["metric"]: row for row in standing["metrics"]}
    assert rows["forget_knowmem"]["knowledge_left"] == pytest.approx(0.2)
    assert rows["forget_mc"]["knowledge_left"] == pytest.approx(1 / 3)
    assert rows["forget_mc"]["above_reference"] == pytest.approx(0.25)
    assert standing["worst"] == "forget_mc"
    assert headline(_metrics(before, after, reference)).startswith(
        "Most knowledge left: forget MC accuracy 50.0 after, 100.0 before (50.0% of it), "
        "reference 25.0 (+25.0 points)"
    )
    assert forget_standing({"before": {}, "after": {}}) is None


def test_the_stop_rules_forget_target_needs_the_set_it_probes():
    from core.engine.spec import SpecError, parse_spec

    base = {"method": "catnip", "base_model": "m", "forget_file": "f.jsonl"}
    for metric, needs in (
        ("verbmem", "forget_text"),
        ("mc", "forget_mc"),
        ("knowmem", "forget_qa"),
    ):
        with pytest.raises(SpecError) as error:
            parse_spec({**base, "eval": {"retain_qa": "r", "forget_target_metric": metric}})
        assert error.value.param == "eval.forget_target_metric"
        assert f"needs eval.{needs}" in str(error.value)
        spec = parse_spec(
            {**base, "eval": {"retain_qa": "r", needs: "x", "forget_target_metric": metric}}
        )
        assert spec.eval.forget_target_metric == metric
    # unnamed, it is KnowMem, and a job without forget questions simply has no stop rule
    assert parse_spec({**base, "eval": {"retain_qa": "r"}}).eval.forget_target_metric == "knowmem"


def test_the_demo_corpus_has_neighbours_of_the_forget_domain_that_the_model_trains_on():
    from core.demo.build import _training_texts, generate_corpus

    corpus = generate_corpus(20, seed=0)
    forget_names = {r["fact"].split("/")[0] for r in corpus["forget_qa"]}
    neighbour_names = {r["fact"].split("/")[0] for r in corpus["neighbor_qa"]}
    assert len(neighbour_names) == 4 and not forget_names & neighbour_names
    assert all("the dragon" in r["prompt"] for r in corpus["neighbor_qa"])  # the same domain
    texts = set(_training_texts(corpus))
    assert all(r["prompt"] + r["response"] in texts for r in corpus["neighbor_qa"])
    assert generate_corpus(20, seed=0) == corpus  # reproducible


def _whole_domain_spec(fixture_dir, tmp_path, **eval_extra):
    from core.engine.spec import parse_spec

    data = fixture_dir / "data"
    domain = tmp_path / "whole_domain_qa.jsonl"
    domain.write_text(
        (data / "forget_qa.jsonl").read_text() + (data / "neighbor_qa.jsonl").read_text()
    )
    return parse_spec(
        {
            "method": "ga",
            "base_model": str(fixture_dir / "model"),
            "forget_file": str(domain),
            "adapter": {"type": "full"},
            "hyperparameters": {
                "learning_rate": 1e-3,
                "max_steps": 6,
                "batch_size": 32,
                "max_length": 64,
            },
            "eval": {
                "forget_qa": str(data / "forget_qa.jsonl"),
                "neighbor_qa": str(data / "neighbor_qa.jsonl"),
                "retain_qa": str(data / "retain_qa.jsonl"),
                "forget_text": str(data / "forget_text.jsonl"),
                "reference_model": str(fixture_dir / "reference"),
                "robustness": {"relearn": {"enabled": False}, "quantization": {"bits": [4]}},
                **eval_extra,
            },
        }
    )


def test_unlearning_the_whole_domain_fails_neighbor_min_ratio_while_forget_passes(
    fixture_dir, tmp_path
):
    """Gradient ascent on the forget dragons and their neighbours alike: forget KnowMem
    falls below half of before (the forget criterion passes), and so do the neighbours,
    which the model knew and the reference (trained on them, not on the forget set) still
    knows: the verdict fails on neighbor_min_ratio alone. The neighbours are measured
    under the quantization and in-context audits too."""
    from core.engine.pipeline import run_job

    criteria = {"forget_knowmem_max_ratio": 0.5, "neighbor_min_ratio": 0.9}
    spec = _whole_domain_spec(fixture_dir, tmp_path, criteria=criteria)
    metrics = run_job(spec, tmp_path / "out", device="cpu").metrics
    before, after = metrics["before"]["neighbor_knowmem"], metrics["after"]["neighbor_knowmem"]
    assert before["rouge_l_f1"] > 0.9, before  # the model learned the neighbours
    assert metrics["reference"]["neighbor_knowmem"]["rouge_l_f1"] > 0.9  # so did the reference
    rows = {row["criterion"]: row for row in metrics["criteria"]}
    assert rows["forget_knowmem_max_ratio"]["passed"] is True, rows
    assert rows["neighbor_min_ratio"]["passed"] is False, rows
    assert rows["neighbor_min_ratio"]["value"] == pytest.approx(
        after["rouge_l_f1"] / before["rouge_l_f1"]
    )
    assert metrics["verdict"] == "fail"
    # the attacks re-measure the neighbours, and the summary names them
    robust = metrics["robustness"]
    assert "neighbor_knowmem" in robust["quantization"]["levels"]["int4"]
    icl = robust["in_context"]
    assert set(icl) >= {"forget_verbmem_f1", "neighbor_knowmem_f1"}, icl
    assert icl["neighbor_knowmem_f1"]["after"] == pytest.approx(after["rouge_l_f1"])
    assert metrics["forget_standing"]["worst"] in {"forget_knowmem", "forget_verbmem"}
    assert neighbor_line(metrics).startswith("Neighbours (eval.neighbor_qa): KnowMem F1")
    assert json.loads(json.dumps(metrics))


def test_the_stop_rule_probes_the_forget_metric_it_is_told_to(fixture_dir):
    """eval.forget_target_metric picks the stop rule's forget probe: on the reference model
    (which never learned the forget dragons, yet continues their passages' template),
    forget KnowMem and VerbMem differ, and each target probes its own metric on the first
    probe_samples records of its set."""
    import torch

    from core.engine.data import load_records
    from core.engine.evaluation.metrics import knowmem, verbmem
    from core.engine.events import Events
    from core.engine.modeling import AdapterSpec, load_base, wrap
    from core.engine.spec.parts import EvalSpec
    from core.engine.stop_rule import StopRule, probe_every

    data = fixture_dir / "data"
    model, tokenizer = load_base(fixture_dir / "reference", torch.device("cpu"))
    wrapped = wrap(model, AdapterSpec(type="full"), need_reference=False)
    sets = {name: str(data / f"{name}.jsonl") for name in ("forget_qa", "retain_qa", "forget_text")}
    expected = {
        "knowmem": knowmem(model, tokenizer, load_records(sets["forget_qa"]).items[:10]),
        "verbmem": verbmem(model, tokenizer, load_records(sets["forget_text"]).items[:10]),
    }
    probed = {}
    for metric in ("knowmem", "verbmem"):
        spec = EvalSpec(**sets, forget_target_metric=metric, probe_samples=10)
        probed[metric] = StopRule(wrapped, tokenizer, spec, 1, Events()).before["forget"]
        assert probed[metric] == pytest.approx(expected[metric]["rouge_l_f1"])
    assert abs(probed["verbmem"] - probed["knowmem"]) > 0.1, probed
    # without the target's set (here: no forget questions) there is no stop rule
    assert probe_every(EvalSpec(retain_qa=sets["retain_qa"]), 20) is None
    assert probe_every(EvalSpec(**sets, forget_target_metric="verbmem"), 20) == 1
