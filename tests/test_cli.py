"""`unlearn run SPEC` from a YAML file with relative paths, and its error path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from core.cli import app


def test_unlearn_run_writes_a_loadable_adapter(fixture_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shutil.copytree(fixture_dir / "data", tmp_path / "data")
    spec = {
        "method": "catnip",
        "base_model": str(fixture_dir / "model"),
        "forget_file": "data/forget_qa.jsonl",
        "adapter": {"type": "lora", "r": 4},
        "hyperparameters": {
            "max_steps": 4,
            "learning_rate": 1e-2,
            "batch_size": 16,
            "max_length": 64,
            "checkpoint_every": 2,
        },
        "eval": {"forget_qa": "data/forget_qa.jsonl", "retain_qa": "data/retain_qa.jsonl"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "job.yaml"), "-o", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "Forget KnowMem ROUGE-L F1" in result.output
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(fixture_dir / "model"), out / "adapter"
    )
    assert model.peft_config["default"].r == 4
    assert (out / "report" / "summary.md").read_text().startswith("# Unlearning report: catnip")
    assert (out / "checkpoints").is_dir()
    throughput = json.loads((out / "metrics.json").read_text())["throughput"]
    assert throughput["device"] == "cpu" and throughput["peak_memory"]["device_bytes"] is None
    assert throughput["steps_per_second"] > 0 and throughput["tokens_per_second"] > 0
    assert throughput["peak_memory"]["host_bytes"] > 100 << 20
    # Rerunning the same command resumes from the last checkpoint (here: the final one).
    again = CliRunner().invoke(
        app, ["run", str(tmp_path / "job.yaml"), "-o", str(out), "--device", "cpu"]
    )
    assert again.exit_code == 0, again.output
    assert "[resumed] from the checkpoint at step" in again.output


def test_unlearn_run_bad_spec_is_a_clear_error(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "method: catnip\nbase_model: m\nforget_file: f\nhyperparameters: {learning_rate: -1}\n"
    )
    result = CliRunner().invoke(app, ["run", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2
    assert "hyperparameters.learning_rate" in result.output


def test_unlearn_run_reports_records_that_max_length_leaves_out(fixture_dir, tmp_path):
    """A forget record whose prompt fills max_length is not unlearned: the run says so
    (stderr), and so do metrics.json and the report, by file line."""
    import json

    lines = (fixture_dir / "data" / "forget_qa.jsonl").read_text().splitlines()[:20]
    lines.insert(4, json.dumps({"prompt": "Q: " + "dragon " * 70 + "?\nA:", "response": " no."}))
    (tmp_path / "forget.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "retain.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "method": "catnip",
        "base_model": str(fixture_dir / "model"),
        "forget_file": "forget.jsonl",
        "retain_file": "retain.jsonl",
        "hyperparameters": {
            "max_steps": 1,
            "batch_size": 8,
            "max_length": 64,
            "retain_loss": "nll",
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "job.yaml"), "-o", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "[warning] forget set: 1 of 21 records have no target token within max_length and will "
        "not be unlearned (lines 5); raise hyperparameters.max_length (64)"
    ) in result.output
    assert (
        "[warning] retain set: 1 of 21 records have no target token within max_length and will "
        "not be trained on (lines 5)"
    ) in result.output
    data = json.loads((out / "metrics.json").read_text())["data"]["forget"]
    assert (data["records"], data["examples"], data["skipped"]) == (
        21,
        20,
        {"count": 1, "lines": [5]},
    )
    summary = (out / "report" / "summary.md").read_text()
    assert "**1 left out: no target token within max_length, not unlearned** (lines 5)" in summary
    assert "- Retain set as trained: 21 records, 20 sequences" in summary
    assert "**1 left out: no target token within max_length, not trained on** (lines 5)" in summary


def test_unlearn_run_checks_eval_files_and_the_device_before_loading(
    fixture_dir, tmp_path, monkeypatch
):
    """Each eval file must hold its slot's kind (a QA file as forget_mc is an
    invalid_file error before the model loads, not a failure inside lm-eval); a device
    that is not there, or a loss backend that cannot run on the job's device, is an error
    with a code, not an AssertionError from torch."""
    shutil.copytree(fixture_dir / "data", tmp_path / "data")
    base = {
        "method": "catnip",
        "base_model": str(fixture_dir / "model"),
        "forget_file": "data/forget_qa.jsonl",
        "hyperparameters": {"max_steps": 1},
    }

    def run(spec, *extra):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        return CliRunner().invoke(
            app, ["run", str(tmp_path / "job.yaml"), "-o", str(tmp_path / "out"), *extra]
        )

    wrong_kind = run({**base, "eval": {"forget_mc": "data/forget_qa.jsonl"}})
    assert wrong_kind.exit_code == 2, wrong_kind.output
    assert (
        "error [invalid_file]: eval.forget_mc: forget_qa.jsonl is invalid: file: a qa file cannot "
        "be used here; expected one of: mc"
    ) in wrong_kind.output
    assert "[loading]" not in wrong_kind.output
    missing = run({**base, "eval": {"retain_qa": "data/nope.jsonl"}})
    assert (
        missing.exit_code == 2
        and "eval.retain_qa: " in missing.output
        and "no such file" in missing.output
    )
    for device, words in (
        ("cuda:99", "device 'cuda:99' was asked for, but this machine has"),
        ("bogus", "device 'bogus' is not a device; use cpu, cuda or cuda:N"),
    ):
        result = run(base, "--device", device)
        assert result.exit_code == 2, result.output
        assert f"error [device_unavailable]: {words}" in result.output
    # the Triton loss backend (LOSS_BACKEND=triton, --loss-backend triton) on a CPU job
    from core.engine import losses

    monkeypatch.setattr(losses.backend, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        result = run(base, "--device", "cpu", "--loss-backend", "triton")
    finally:
        losses.set_backend("auto")
    assert result.exit_code == 2, result.output
    assert (
        "error [device_unavailable]: the triton loss backend runs on CUDA tensors, not cpu; "
        "use the auto loss backend"
    ) in result.output


def test_rerun_with_an_edited_spec_is_refused_before_the_evaluation(fixture_dir, tmp_path):
    """The output's checkpoints belong to the first spec: a rerun with another learning
    rate stops at loading with checkpoint_mismatch, before the (long) evaluation."""
    shutil.copytree(fixture_dir / "data", tmp_path / "data")
    spec = {
        "method": "catnip",
        "base_model": str(fixture_dir / "model"),
        "forget_file": "data/forget_qa.jsonl",
        "hyperparameters": {
            "max_steps": 2,
            "batch_size": 8,
            "max_length": 64,
            "learning_rate": 1e-3,
        },
        "eval": {"forget_qa": "data/forget_qa.jsonl", "max_samples": 10},
    }
    out = tmp_path / "out"

    def run(spec):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        return CliRunner().invoke(
            app, ["run", str(tmp_path / "job.yaml"), "-o", str(out), "--device", "cpu"]
        )

    assert run(spec).exit_code == 0
    edited = run({**spec, "hyperparameters": {**spec["hyperparameters"], "learning_rate": 2e-3}})
    assert edited.exit_code == 2, edited.output
    assert "error [checkpoint_mismatch]: the checkpoint " in edited.output
    assert "[evaluating_before]" not in edited.output
    again = run(spec)  # the same spec resumes at its end
    assert again.exit_code == 0 and "[resumed] from the checkpoint at step 2" in again.output


def test_a_run_stopped_early_and_resumed_keeps_its_best_state(fixture_dir, tmp_path):
    """The stop rule ends the run at step 2 (utility below the floor) and keeps step 1.
    A rerun resumes at the end (as a service job killed while evaluating or uploading
    does) and must keep step 1 too, not the initial model: the rule's best state is in
    the checkpoint."""
    import json

    from safetensors.torch import load_file

    shutil.copytree(fixture_dir / "data", tmp_path / "data")
    spec = {
        "method": "catnip",
        "base_model": str(fixture_dir / "model"),
        "forget_file": "data/forget_qa.jsonl",
        "adapter": {"type": "full"},
        "hyperparameters": {
            "max_steps": 12,
            "batch_size": 32,
            "max_length": 64,
            "learning_rate": 3e-3,
            "checkpoint_every": 3,
        },
        "eval": {
            "forget_qa": "data/forget_qa.jsonl",
            "retain_qa": "data/retain_qa.jsonl",
            "probe_every": 1,
            "probe_samples": 50,
            "max_samples": 50,
            "utility_budget": 0.1,
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"

    def run():
        result = CliRunner().invoke(
            app, ["run", str(tmp_path / "job.yaml"), "-o", str(out), "--device", "cpu"]
        )
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        return result.output, metrics, load_file(out / "model" / "model.safetensors")

    _, first, weights = run()
    assert first["stop_rule"]["restored_step"] == 1 and first["steps"]["done"] == 2
    output, again, weights_again = run()
    assert "[resumed] from the checkpoint at step 2" in output
    assert again["stop_rule"] == first["stop_rule"]
    assert again["after"]["forget_knowmem"] == first["after"]["forget_knowmem"]
    assert all(torch.equal(weights[n], weights_again[n]) for n in weights)


def test_build_demo_shows_its_progress(tmp_path):
    """`unlearn build-demo` (and the demo, which builds the model first) trains for
    minutes: it shows a bar over the epochs and each accuracy check on the terminal, then
    the build's summary."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "core",
            "build-demo",
            "--size",
            "fixture",
            "--directory",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "[building the demo model] until it answers 99% of 100 + 100" in result.stderr
    assert "probe @ 10: dragons" in result.stderr  # the accuracy check every 10 epochs
    assert "step/s" in result.stderr or "s/step" in result.stderr  # tqdm's bar over the epochs
    info = json.loads(result.stdout)
    assert info["epochs"] >= 10 and (tmp_path / "model" / "config.json").is_file()
    # a true throughput on every update, and an ETA only once the accuracy has a trend
    # (tqdm's own ETA, from the 400-epoch bound, is not shown)
    shown = re.findall(r"\| *(\d+)/400 \[[^\]]*tok_s=(\d+), eta=([^\]\s]+) *\]", result.stderr)
    assert shown and all(int(tok_s) > 0 for _, tok_s, _ in shown), "tok_s=0 shown"
    assert {eta for epoch, _, eta in shown if int(epoch) <= 20} == {"?"}
    if info["epochs"] > 30:  # the ETA shown after the third check aims at the stop
        later = [eta for epoch, _, eta in shown if int(epoch) > 30]
        assert later and all(eta != "?" for eta in later)
        # the last ETA shown, from the last checks' trend, is far below what the bound gives
        epoch, eta = max((int(e), _seconds(t)) for e, _, t in shown if int(e) > 30)
        if info["epochs"] < 200:
            bound = (400 - epoch) * info["seconds_per_epoch"]
            assert eta < bound / 2, (epoch, eta, bound, info["epochs"])


def _seconds(interval: str) -> float:
    parts = [float(p) for p in interval.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def test_the_demo_build_expects_to_stop_where_its_accuracy_trend_reaches_the_target():
    from core.demo.training import epochs_to_target, expected_stop

    assert epochs_to_target([], 400) is None
    assert epochs_to_target([(10, 0.2)], 400) is None  # one check: no trend yet
    assert epochs_to_target([(10, 0.2), (20, 0.6)], 400) == 30  # 0.04 a epoch to 0.99
    assert epochs_to_target([(10, 0.5), (20, 0.4)], 400) is None  # falling: no estimate
    assert epochs_to_target([(10, 0.001), (20, 0.002)], 400) == 400  # capped at the bound
    assert epochs_to_target([(10, 0.9), (20, 0.995)], 400) == 20
    # seen from an epoch: the next check at or after the trend's epoch, never one past
    assert expected_stop([(10, 0.2), (20, 0.6)], 21, 400) == 30
    assert expected_stop([(30, 0.8), (40, 0.98)], 45, 400) == 50  # trend said 41: next check
    assert expected_stop([(10, 0.2)], 15, 400) is None


def test_jobs_list_shows_a_succeeded_job_s_verdict_beside_its_status():
    """A succeeded job may fail its criteria: the list says so where it says succeeded."""
    from api.cli.tenant import job_line

    job = {
        "id": "job-1",
        "status": "succeeded",
        "verdict": "fail",
        "method": "catnip",
        "base_model": "tiny",
        "progress": {"step": 14, "total_steps": 60},
        "created_at": "2026-12-07T00:00:00Z",
    }
    assert job_line(job).split("\t") == [
        "job-1",
        "succeeded (verdict fail)",
        "catnip",
        "tiny",
        "14/60",
        "2026-12-07T00:00:00Z",
    ]
    queued = {
        **job,
        "status": "queued",
        "verdict": None,
        "progress": {"step": 0, "total_steps": None},
    }
    assert job_line(queued).split("\t")[1:5] == ["queued", "catnip", "tiny", "0/?"]


def test_the_demo_prints_its_tenant_key_and_how_to_open_its_job(capsys):
    """The demo's job is the tenant demo's: the key it made is shown once, with the
    commands that serve the same data and the dashboard's address of the job."""
    from api.cli.demo import _print_access

    _print_access("ul_secret-key", "job-123", Path("/data/here"))
    out = capsys.readouterr().out
    assert "tenant is demo" in out and "ul_secret-key" in out
    assert "UNLEARN_DATA_DIR=/data/here unlearn serve --port 8000" in out
    assert "http://127.0.0.1:8000/dashboard#/jobs/job-123" in out


def test_a_negative_recovery_is_said_in_words():
    from core.engine.evaluation.summary import evidence_lines

    settings = {"steps": 5, "learning_rate": 1e-3, "attack_questions": 2, "trains": "full"}
    relearn = {
        "status": "done",
        "settings": settings | {"measured_questions": 8},
        "forget_knowmem_f1": {"before": 0.9, "after": 0.2, "after_attack": 0.1},
        "recovery": -0.72,
    }
    lines = evidence_lines({"robustness": {"relearn": relearn}})
    line = next(line for line in lines if line.startswith("Relearning attack"))
    assert "recovery -0.72 (negative: the attack made it forget more)" in line
    relearn["recovery"] = 0.31
    line = next(line for line in evidence_lines({"robustness": {"relearn": relearn}}))
    assert "recovery 0.31." in line or "recovery 0.31 " in line
