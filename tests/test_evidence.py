"""The evidence's building blocks on hand-made cases: the quantizer, Min-K% and AUC,
recovery, the verdict, the certificate; and a relearning attack that must fail a
shallow unlearning (an audit that cannot fail proves nothing)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.engine.evaluation import robustness
from core.engine.evaluation.evidence import judge
from core.engine.evaluation.privacy import auc, min_k_scores, privleak
from core.engine.spec.parts import CriteriaSpec


def test_quantize_rtn_on_a_known_tensor():
    """Two groups of two along the input dimension, 2 bits (levels 0..3):
    group [0, 3]: scale = 3/3 = 1, zero = round(-0/1) = 0; 0 -> 0, 3 -> 3: exact.
    group [-1, 0.5]: scale = 1.5/3 = 0.5, zero = round(1/0.5) = 2;
        -1 -> round(-2) + 2 = 0 -> (0 - 2) * 0.5 = -1;  0.5 -> round(1) + 2 = 3 -> 0.5: exact.
    A value between levels rounds to the nearest: 1.4 in [0, 3] -> q = 1 -> 1.0.
    A constant group stays as it is (no grid to put it on)."""
    w = torch.tensor([[0.0, 3.0, -1.0, 0.5], [0.0, 1.4, 7.0, 7.0]])
    q = robustness.quantize_rtn(w, bits=2, group_size=2)
    # second row, first group [0, 1.4]: scale 1.4/3, 1.4 -> q 3 -> 1.4 exactly; constant [7, 7]
    assert torch.allclose(q, torch.tensor([[0.0, 3.0, -1.0, 0.5], [0.0, 1.4, 7.0, 7.0]]), atol=1e-6)
    w = torch.tensor([[0.0, 1.4, 3.0, 0.2]])
    q = robustness.quantize_rtn(w, bits=2, group_size=4)  # one group [0, 3], scale 1
    assert torch.allclose(q, torch.tensor([[0.0, 1.0, 3.0, 0.0]]), atol=1e-6)


def test_quantize_rtn_error_is_at_most_half_a_step_and_8_bits_beat_4():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits in (8, 4):
        q = robustness.quantize_rtn(w, bits=bits, group_size=128)
        groups = w.view(64, 2, 128)
        step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)  # [64, 2]
        error = (q - w).abs().view(64, 2, 128).amax(-1)
        assert (error <= step / 2 + step * 0.01 + 1e-6).all()
    assert (robustness.quantize_rtn(w, 8, 128) - w).abs().mean() < (
        robustness.quantize_rtn(w, 4, 128) - w
    ).abs().mean() / 10


def test_min_k_takes_the_mean_of_the_lowest_share():
    """k = 0.4 of 5 counted tokens: ceil(2.0) = 2 lowest, -5 and -4 -> -4.5. With the
    first two masked out, 3 count: ceil(1.2) = 2 lowest of (-2, -3, -4) -> -3.5. A
    sequence with none counted is NaN."""
    logp = torch.tensor([[-1.0, -5.0, -2.0, -3.0, -4.0]] * 3)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True], [False] * 5])
    scores = min_k_scores(logp, mask, 0.4)
    assert scores[0].item() == pytest.approx(-4.5) and scores[1].item() == pytest.approx(-3.5)
    assert math.isnan(scores[2].item())


def test_auc_and_privleak_on_controlled_scores():
    assert auc([3, 4, 5], [1, 2]) == 1.0  # members score higher: perfectly told apart
    assert auc([1, 2], [3, 4, 5]) == 0.0
    assert auc([1, 2, 3], [1, 2, 3]) == 0.5  # the same scores: chance
    assert auc([2, 4], [1, 3]) == 0.75  # 3 of the 4 member/non-member pairs ordered
    assert privleak(0.6, 0.5) == pytest.approx(0.2) and privleak(0.5, 0.5) == 0.0


def test_recovery_and_the_attack_split():
    assert robustness.recovery(1.0, 0.2, 0.6) == pytest.approx(0.5)
    assert robustness.recovery(1.0, 0.2, 0.2) == 0.0
    assert robustness.recovery(0.5, 0.5, 0.9) is None  # nothing was removed: nothing to recover
    split = robustness.split_for_attack(10, 0.2, seed=0)
    assert len(split.attack) == 2 and len(split.measured) == 8
    assert not set(split.attack) & set(split.measured)
    assert split == robustness.split_for_attack(10, 0.2, seed=0)


def test_the_verdict_passes_fails_or_says_what_it_could_not_evaluate():
    metrics = {
        "tradeoff": {
            "forget_before": 100.0,
            "forget_after": 30.0,
            "utility_before": 100.0,
            "utility_after": 95.0,
        },
        "robustness": {"relearn": {"recovery": 0.7}},
        "privacy": {"after": {"status": "off"}},
    }
    verdict, rows = judge(
        CriteriaSpec(forget_knowmem_max_ratio=0.5, utility_min_ratio=0.9), metrics
    )
    assert verdict == "pass" and [r["passed"] for r in rows] == [True, True]
    assert rows[0]["value"] == pytest.approx(0.3)
    verdict, rows = judge(
        CriteriaSpec(forget_knowmem_max_ratio=0.5, relearn_recovery_max=0.5), metrics
    )
    assert verdict == "fail" and rows[1] == {**rows[1], "passed": False, "value": 0.7}
    verdict, rows = judge(
        CriteriaSpec(forget_knowmem_max_ratio=0.5, mia_auc_max_distance=0.1), metrics
    )
    assert (
        verdict == "not_evaluated"
        and rows[1]["passed"] is None
        and "eval.holdout" in rows[1]["reason"]
    )
    assert judge(None, metrics) == ("not_evaluated", [])


def test_the_quantization_audit_exposes_forgetting_hidden_inside_the_4_bit_grid(fixture_dir):
    """A hand-made "unlearned" model: the 4-bit grid of the fixture model, which knows
    every fact, plus one signed gradient-ascent step on the forget questions of 0.45 of
    each weight's 4-bit step: under half a step, so rounding undoes it (each row's
    extremes, which fix the grid, left alone). At full precision, and at 8 bits (a finer grid), it has lost about half the answers;
    rounded to 4 bits it is the model that knows them all again. The audit re-measures
    every forget and utility metric at each level, and the 4-bit criterion fails it."""
    from core.engine.data import Records, build_examples, collate, load_records
    from core.engine.evaluation import knowmem
    from core.engine.evaluation.evidence import robustness_audits
    from core.engine.modeling import AdapterSpec, load_base, wrap
    from core.engine.spec.parts import EvalSpec

    data = fixture_dir / "data"
    model, tokenizer = load_base(fixture_dir / "model", torch.device("cpu"))
    questions = load_records(data / "forget_qa.jsonl").items[:100]

    def per_question() -> list[float]:
        return knowmem(model, tokenizer, questions, max_new_tokens=16)["per_sample_f1"]

    before = per_question()
    batch = collate(build_examples(Records("qa", questions), tokenizer, 64), tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    ).backward()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                w = module.weight
                high, low = w.amax(1, keepdim=True), w.amin(1, keepdim=True)
                step = (high - low) / 15  # one group per row: 48 and 96 inputs < 128
                grid = robustness.quantize_rtn(w, 4, 128)
                inner = (w != high) & (w != low)
                w.copy_(torch.where(inner, grid + 0.45 * step * w.grad.sign(), grid))
    model.zero_grad(set_to_none=True)
    after = per_question()
    spec = EvalSpec(
        forget_qa=str(data / "forget_qa.jsonl"),
        retain_qa=str(data / "retain_qa.jsonl"),
        forget_text=str(data / "forget_text.jsonl"),
        retain_text=str(data / "retain_text.jsonl"),
        forget_mc=str(data / "forget_mc.jsonl"),
        general_mc=str(data / "general_mc.jsonl"),
        robustness={"relearn": {"enabled": False}, "in_context": {"enabled": False}},
    )
    robust = robustness_audits(
        wrap(model, AdapterSpec(type="full"), need_reference=False),
        tokenizer,
        spec,
        before_scores=before,
        after_scores=after,
        max_length=64,
    )
    quant = robust["quantization"]
    unquantized, levels = quant["baseline"]["unquantized"], quant["levels"]
    measured = {
        "forget_knowmem",
        "retain_knowmem",
        "forget_verbmem",
        "retain_perplexity",
        "forget_mc",
        "general_mc",
    }
    assert set(unquantized) == measured and set(levels) == {"int8", "int4"}
    assert all(set(levels[s]) == measured | {"seconds"} for s in levels), levels
    forget = {
        s: f["forget_knowmem"]["rouge_l_f1"] for s, f in [*levels.items(), ("-", unquantized)]
    }
    assert sum(before) / len(before) > 0.95 and forget["-"] < 0.6, forget  # it looked forgotten
    assert forget["int8"] < 0.6 and forget["int4"] > 0.9, forget  # and 4 bits bring it back
    assert levels["int4"]["retain_knowmem"]["rouge_l_f1"] > 0.9
    verdict, rows = judge(CriteriaSpec(quantized_forget_max_ratio=0.5), {"robustness": robust})
    assert verdict == "fail" and rows[0]["value"] > 0.9, rows


def test_a_certificate_round_trips_and_fails_on_any_changed_byte(tmp_path):
    from core.service.signing import Keyring, VerificationError, verify

    keyring = Keyring(tmp_path / "keys")
    content = {
        "job": {"id": "job-1", "tenant": "acme"},
        "metrics": {"f": 0.25, "n": 3},
        "artifacts": {"adapter": {"sha256": "ab" * 32}},
        "verdict": "pass",
    }
    certificate = keyring.sign(content)
    keys = keyring.public_keys()
    assert {k: v for k, v in verify(certificate, keys).items()} == content
    for position in range(len(certificate)):
        changed = bytearray(certificate)
        changed[position] = (changed[position] + 1) % 256
        with pytest.raises(VerificationError):
            verify(bytes(changed), keys)
    # A rotated keyring still verifies the old certificate; a stranger's key does not.
    old_id = keyring.active_id()
    new_id = keyring.rotate()
    assert new_id != old_id and verify(certificate, keyring.public_keys())
    stranger = Keyring(tmp_path / "other")
    stranger.ensure()
    with pytest.raises(VerificationError, match="no public key"):
        verify(certificate, stranger.public_keys())


def test_unlearn_verify_checks_the_artifact_with_the_public_key_alone(tmp_path):
    from typer.testing import CliRunner

    from api.cli import app
    from core.service.signing import Keyring, file_digest, public_pem

    artifact = tmp_path / "adapter.tar.gz"
    artifact.write_bytes(b"the adapter")
    keyring = Keyring(tmp_path / "keys")
    certificate = tmp_path / "cert.json"
    certificate.write_bytes(
        keyring.sign(
            {"job": {"id": "job-1"}, "artifacts": {"adapter": {"sha256": file_digest(artifact)}}}
        )
        + b"\n"
    )
    public = tmp_path / "public.pem"  # only the public key leaves the signer
    public.write_text(public_pem(keyring.private(keyring.active_id()).public_key()))
    ok = CliRunner().invoke(
        app, ["verify", str(certificate), "--keys", str(public), "--artifact", str(artifact)]
    )
    assert ok.exit_code == 0 and "valid: job job-1" in ok.output, ok.output
    artifact.write_bytes(b"the adapter, changed")
    bad = CliRunner().invoke(
        app, ["verify", str(certificate), "--keys", str(public), "--artifact", str(artifact)]
    )
    assert bad.exit_code == 1 and "is not an artifact this certificate lists" in bad.output
    assert f"signed by key {keyring.active_id()}" in ok.output  # the key it checked with
    certificate.write_text(certificate.read_text().replace('"job-1"', '"job-2"'))
    bad = CliRunner().invoke(app, ["verify", str(certificate), "--keys", str(public)])
    assert bad.exit_code == 1 and "signature does not match" in bad.output


def test_unlearn_verify_that_cannot_check_says_so_and_never_reads_as_invalid(tmp_path, monkeypatch):
    """No key source, a key file or a certificate that cannot be read: exit 2, "not
    checked", with what to pass; exit 1 (INVALID) is kept for a certificate that was
    checked and failed."""
    from typer.testing import CliRunner

    from api.cli import app

    monkeypatch.delenv("UNLEARN_API_URL", raising=False)
    certificate = tmp_path / "cert.json"
    certificate.write_text("{}")
    none = CliRunner().invoke(app, ["verify", str(certificate)])
    assert none.exit_code == 2, none.output
    assert "pass --keys" in none.output and "UNLEARN_API_URL" in none.output
    assert "INVALID" not in none.output and "not checked" in none.output
    missing = CliRunner().invoke(app, ["verify", str(certificate), "--keys", "nowhere.json"])
    assert missing.exit_code == 2 and "cannot read the public keys from nowhere.json" in (
        missing.output
    )


def test_the_relearning_attack_measures_mc_on_the_facts_it_did_not_train_on(tmp_path):
    """Where the forget questions and MC items name their `fact`, the attack's MC leaves
    out the items of the facts it trained on; where they do not, it measures the whole
    set. Its forget MC before the attack comes from the after evaluation's answers to
    those items (None when it has none for exactly them)."""
    from core.engine.data import load_records
    from core.engine.evaluation.attacks.context import mc_after, mc_items_not_of
    from core.engine.spec.parts import EvalSpec

    def mc(path, facts):
        path.write_text(
            "".join(
                json.dumps({"question": f"q{n}", "choices": ["a", "b"], "answer": 0, **fact}) + "\n"
                for n, fact in enumerate(facts)
            )
        )
        return EvalSpec(forget_mc=str(path))

    named = mc(tmp_path / "named.jsonl", [{"fact": f} for f in ("x", "y", "x", "z")])
    select = mc_items_not_of(named, [{"prompt": "Q", "response": "A", "fact": "x"}])
    items = load_records(named.forget_mc).items
    assert select is not None and [i["question"] for i in items if select(i)] == ["q1", "q3"]
    after = {"forget_mc": {"accuracy": 0.5, "n": 4, "per_item_correct": [True, True, False, False]}}
    assert mc_after(after, named, select) == {"accuracy": 0.5, "n": 2}  # q1 right, q3 wrong
    assert mc_after(after, named, None) == {"accuracy": 0.5, "n": 4}
    three = {"forget_mc": {"per_item_correct": [True, True, False]}}  # answers for other items
    assert mc_after(three, named, select) is None
    assert mc_after({"forget_mc": {"accuracy": 0.5, "n": 4}}, named, select) is None
    unnamed = mc(tmp_path / "unnamed.jsonl", [{"fact": "x"}, {}])
    assert mc_items_not_of(unnamed, [{"prompt": "Q", "response": "A", "fact": "x"}]) is None
    assert mc_items_not_of(named, [{"prompt": "Q", "response": "A"}]) is None  # no fact named


def test_the_relearning_attack_exposes_shallow_unlearning(fixture_dir, tmp_path):
    """A few steps of gradient ascent hide the forget answers; 20 fine-tuning steps on a
    fifth of the questions bring back the answers to the other four fifths (recovery well
    above 0), where the reference model, which never learned them, cannot answer them
    after the same attack."""
    from core.engine.data import load_records
    from core.engine.pipeline import run_job
    from core.engine.spec import parse_spec

    data = fixture_dir / "data"
    spec = parse_spec(
        {
            "method": "ga",
            "base_model": str(fixture_dir / "model"),
            "forget_file": str(data / "forget_qa.jsonl"),
            "adapter": {"type": "full"},
            "hyperparameters": {
                "learning_rate": 1e-3,
                "max_steps": 4,
                "batch_size": 32,
                "max_length": 64,
            },
            "eval": {
                "forget_qa": str(data / "forget_qa.jsonl"),
                "retain_qa": str(data / "retain_qa.jsonl"),
                "forget_mc": str(data / "forget_mc.jsonl"),
                "reference_model": str(fixture_dir / "reference"),
                "robustness": {
                    "relearn": {"steps": 20, "learning_rate": 1e-4},
                    "quantization": {"enabled": False},
                    "in_context": {"enabled": False},
                },
            },
        }
    )
    metrics = run_job(spec, tmp_path / "out", device="cpu").metrics
    relearn = metrics["robustness"]["relearn"]
    assert [cell["cell"] for cell in relearn["cells"]] == ["qa, lr 0.0001, 20 steps"]
    f1 = relearn["forget_knowmem_f1"]
    assert f1["before"] > 0.9 and f1["after"] < 0.5 * f1["before"], f1  # it looked forgotten
    assert relearn["recovery"] > 0.5, relearn  # and came back
    # MC after the attack is measured on the facts it did not train on only
    questions = load_records(data / "forget_qa.jsonl").items[: spec.eval.robustness.max_samples]
    split = robustness.split_for_attack(len(questions), 0.2, seed=0)
    attacked_facts = {questions[i]["fact"] for i in split.attack}
    items = load_records(data / "forget_mc.jsonl").items
    assert relearn["forget_mc"]["items"] == sum(i["fact"] not in attacked_facts for i in items)
    assert relearn["forget_mc"]["items"] < len(items)
    assert relearn["forget_mc"]["scope"].startswith("the items of the facts the attack questions")
    assert 0 <= relearn["forget_mc"]["after_attack"] <= 1
    assert json.loads(json.dumps(metrics))  # stored as JSON
    # The same attack on the reference model (never saw these facts) brings nothing back.
    from core.engine.data import Records
    from core.engine.evaluation.attacks.context import knowmem_figures as _knowmem
    from core.engine.modeling import AdapterSpec, load_base, wrap

    model, tokenizer = load_base(fixture_dir / "reference", torch.device("cpu"))
    wrapped = wrap(model, AdapterSpec(type="full"), need_reference=False)
    robustness.relearn(
        wrapped,
        tokenizer,
        Records("qa", [questions[i] for i in split.attack]),
        steps=20,
        learning_rate=1e-4,
        batch_size=8,
        max_length=64,
        seed=0,
    )
    attacked = _knowmem(wrapped.model, tokenizer, spec.eval, [questions[i] for i in split.measured])
    assert attacked["rouge_l_f1"] < f1["after"] + 0.5 * (f1["before"] - f1["after"]), attacked


def test_artifacts_name_the_base_model_as_their_readers_know_it(fixture_dir, tmp_path):
    """The service names the base model by its registered name: the adapter's config and
    model card carry it, not the worker's directory, and no file of any artifact holds a
    local path; provenance.json beside the weights says what made them. Run as `unlearn
    run` (nothing shown), the adapter names the directory it was loaded from."""
    from core.engine.pipeline import run_job
    from core.engine.spec import parse_spec

    data = fixture_dir / "data"
    spec = parse_spec(
        {
            "method": "catnip",
            "base_model": str(fixture_dir / "model"),
            "forget_file": str(data / "forget_qa.jsonl"),
            "adapter": {"type": "lora", "merge": True},
            "hyperparameters": {"max_steps": 1, "batch_size": 8, "max_length": 64},
            "eval": {"forget_qa": str(data / "forget_qa.jsonl"), "max_samples": 10},
        }
    )
    shown = {
        "job": "job-0123",
        "base_model": "tiny",
        "base_model_digest": "sha256:abc",
        "forget_file": "file-1 (forget.jsonl)",
    }
    result = run_job(spec, tmp_path / "service", device="cpu", shown=shown)
    assert set(result.artifacts) == {"adapter", "model", "report"}
    for directory in result.artifacts.values():
        for path in directory.rglob("*"):
            if path.is_file():
                assert str(fixture_dir).encode() not in path.read_bytes(), path
                assert str(tmp_path).encode() not in path.read_bytes(), path
    adapter = result.artifacts["adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    provenance = json.loads((adapter / "provenance.json").read_text())
    assert provenance["job"] == "job-0123" and provenance["method"] == "catnip"
    assert provenance["base_model"] == {"name": "tiny", "digest": "sha256:abc"}
    assert provenance["tradeoff"] == result.metrics["tradeoff"]
    assert (result.artifacts["model"] / "provenance.json").is_file()

    local = run_job(spec, tmp_path / "cli", device="cpu")
    config = json.loads((local.artifacts["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(fixture_dir / "model")
