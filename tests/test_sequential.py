"""Sequential unlearning (init_from_job): a job starts from a previous job's output; after
LoRA on LoRA, one adapter for the whole chain on the base model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from core.engine.checkpoint import run_fingerprint
from core.engine.modeling import AdapterSpec, load_base, wrap
from core.engine.pipeline import run_job
from core.engine.sequential import StartPoint, stack_adapters, start_digest, start_point
from core.engine.spec import load_spec, parse_spec
from core.engine.spec.methods import METHODS, parse_params
from core.errors import DataError, ModelError, SpecError


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _random_adapter(fixture_dir, out, seed: int, **config) -> None:
    """An adapter with random A and B (peft starts B at zero, which would hide a wrong sum)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(out)


def test_stacked_adapter_is_the_two_merged_in_turn(fixture_dir, tmp_path):
    """base + stack(a1, a2) gives the logits of base with a1 merged, then a2 merged: with
    different ranks, scales (one rsLoRA) and target modules (a2 adapts only q_proj: zero
    rows elsewhere)."""
    _random_adapter(
        fixture_dir, tmp_path / "a1", 1, r=8, lora_alpha=16, target_modules="all-linear"
    )
    _random_adapter(
        fixture_dir,
        tmp_path / "a2",
        2,
        r=4,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj"],
    )
    config = stack_adapters(tmp_path / "a1", tmp_path / "a2", tmp_path / "stacked")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (12, 12, False)

    ids = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(0))
    in_turn = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    in_turn = PeftModel.from_pretrained(in_turn, tmp_path / "a1").merge_and_unload()
    in_turn = PeftModel.from_pretrained(in_turn, tmp_path / "a2").merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    stacked = PeftModel.from_pretrained(base, tmp_path / "stacked")
    expected, got = _logits(in_turn, ids), _logits(stacked, ids)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # the sum is what matters: either adapter alone gives other logits
    only_first = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(fixture_dir / "model"), tmp_path / "a1"
    )
    assert (_logits(only_first, ids) - expected).abs().max() > 1e-3


def test_what_cannot_stack_is_refused_by_name(fixture_dir, tmp_path):
    _random_adapter(fixture_dir, tmp_path / "a1", 1, r=4, target_modules=["q_proj"])
    config = json.loads((tmp_path / "a1" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    shutil.copy(tmp_path / "a1" / "adapter_model.safetensors", tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ModelError, match="DoRA"):
        stack_adapters(tmp_path / "dora", tmp_path / "a1", tmp_path / "out")
    with pytest.raises(DataError, match="neither adapter/adapter_config.json") as caught:
        start_point(tmp_path / "a1")  # an adapter directory, not a job's output
    assert caught.value.param == "init_from_job"


def _job(
    fixture_dir, out, *, init=None, adapter=None, method="catnip", lr=5e-3, forget=None
) -> dict:
    data = fixture_dir / "data"
    raw = {
        "method": method,
        "base_model": str(fixture_dir / "model"),
        "forget_file": str(forget or data / "forget_qa.jsonl"),
        "adapter": adapter or {"type": "lora"},
        "hyperparameters": {
            "max_steps": 3,
            "batch_size": 16,
            "max_length": 64,
            "learning_rate": lr,
        },
        "eval": {
            "forget_qa": str(data / "forget_qa.jsonl"),
            "retain_qa": str(data / "retain_qa.jsonl"),
            "max_samples": 60,
            "utility_budget": 1.0,  # the stop rule keeps the last step: each job moves on
            "robustness": {
                "relearn": {"enabled": False},
                "quantization": {"enabled": False},
                "in_context": {"enabled": False},
            },
        },
    }
    if init is not None:
        raw["init_from_job"] = str(init)
    return run_job(parse_spec(raw), out, device="cpu").metrics


def _f1(metrics: dict, when: str, which: str) -> float:
    return metrics[when][f"{which}_knowmem"]["rouge_l_f1"]


def test_a_chain_of_jobs_starts_where_the_last_ended_and_loads_on_the_base(fixture_dir, tmp_path):
    """LoRA -> LoRA -> full weights, each on the next half of the forget set, as deletion
    requests arrive: each job's "before" is the previous job's "after"; the second job's
    one adapter on the base model is its merged weights; the chain is recorded in the
    metrics and the report."""
    lines = (fixture_dir / "data" / "forget_qa.jsonl").read_text().splitlines(keepends=True)
    halves = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    halves[0].write_text("".join(lines[: len(lines) // 2]))
    halves[1].write_text("".join(lines[len(lines) // 2 :]))
    first = _job(fixture_dir, tmp_path / "first", forget=halves[0])
    assert "chain" not in first
    assert _f1(first, "after", "forget") < _f1(first, "before", "forget")
    second = _job(
        fixture_dir,
        tmp_path / "second",
        init=tmp_path / "first",
        adapter={"merge": True},
        forget=halves[1],
    )
    for which in ("forget", "retain"):
        assert _f1(second, "before", which) == pytest.approx(_f1(first, "after", which), abs=0.01)
    assert _f1(second, "after", "forget") < _f1(second, "before", "forget")
    assert second["chain"] == [
        {"job": str(tmp_path / "first"), "method": "catnip", "output": "adapter"}
    ]
    summary = (tmp_path / "second" / "report" / "summary.md").read_text()
    assert f"- Starts from: `{tmp_path / 'first'}` (catnip)'s output (adapter)" in summary

    stacked = json.loads((tmp_path / "second" / "adapter" / "adapter_config.json").read_text())
    assert stacked["r"] == 16  # 8 + 8
    ids = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    on_base = PeftModel.from_pretrained(base, tmp_path / "second" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "second" / "model")
    assert torch.allclose(_logits(on_base, ids), _logits(merged, ids), atol=1e-4)

    third = _job(
        fixture_dir, tmp_path / "third", init=tmp_path / "second", adapter={"type": "full"}, lr=1e-3
    )
    assert [link["job"] for link in third["chain"]] == [
        str(tmp_path / "first"),
        str(tmp_path / "second"),
    ]
    for which in ("forget", "retain"):
        assert _f1(third, "before", which) == pytest.approx(_f1(second, "after", which), abs=0.01)
    assert (tmp_path / "third" / "model" / "config.json").is_file()


def test_lora_after_a_full_weight_job_trains_on_its_weights(fixture_dir, tmp_path):
    full = _job(fixture_dir, tmp_path / "full", adapter={"type": "full"}, lr=1e-3)
    lora = _job(fixture_dir, tmp_path / "lora", init=tmp_path / "full", method="npo")
    assert _f1(lora, "before", "forget") == pytest.approx(_f1(full, "after", "forget"), abs=0.01)
    assert lora["chain"][-1]["output"] == "model"
    config = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8  # on the previous job's weights, not stacked


def test_a_start_of_another_model_is_refused_before_training(fixture_dir, tmp_path):
    other = tmp_path / "other" / "model"
    shutil.copytree(fixture_dir / "model", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "hidden_size": 2 * config["hidden_size"]})
    )
    with pytest.raises(ModelError, match="hidden_size"):
        _job(fixture_dir, tmp_path / "out", init=tmp_path / "other")
    assert not (tmp_path / "out").exists()
    # an adapter whose tensors do not fit the base model
    _random_adapter(fixture_dir, tmp_path / "prev" / "adapter", 1, r=4, target_modules=["q_proj"])
    weights = tmp_path / "prev" / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({k: torch.cat([v, v], dim=-1) for k, v in tensors.items()}, str(weights))
    with pytest.raises(ModelError, match="does not fit this base model"):
        _job(fixture_dir, tmp_path / "out", init=tmp_path / "prev")


def test_a_resume_must_start_from_the_same_weights(fixture_dir, tmp_path):
    for seed, name in ((1, "a"), (2, "b")):
        _random_adapter(
            fixture_dir, tmp_path / name / "adapter", seed, r=4, target_modules=["q_proj"]
        )
    digests = {start_digest(StartPoint(tmp_path / n, "adapter")) for n in "ab"}
    assert len(digests) == 2
    model, _ = load_base(fixture_dir / "model", torch.device("cpu"))
    wrapped = wrap(model, AdapterSpec(), need_reference=False)
    params = parse_params("catnip", {})
    prints = {
        run_fingerprint(METHODS["catnip"], params, wrapped, [], None, start=d) for d in digests
    }
    assert len(prints) == 2
    assert run_fingerprint(METHODS["catnip"], params, wrapped, [], None) not in prints


def test_the_spec_resolves_init_from_job_relative_to_its_file(fixture_dir, tmp_path):
    (tmp_path / "spec.yaml").write_text(
        f"method: catnip\nbase_model: {fixture_dir / 'model'}\n"
        f"forget_file: {fixture_dir / 'data' / 'forget_qa.jsonl'}\ninit_from_job: runs/first\n"
    )
    assert load_spec(tmp_path / "spec.yaml").init_from_job == str(tmp_path / "runs" / "first")
    with pytest.raises(SpecError, match="init_from_job"):
        parse_spec({"method": "catnip", "base_model": "m", "forget_file": "f", "init_from_job": ""})
