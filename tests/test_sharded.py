"""Full-weight jobs sharded over several processes (FSDP2 under torchrun, gloo on the
CPU): the same weights as one process, checkpoints a killed job resumes from, errors and
cancels that leave no rank behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from engine_setup import method_data, setup_run, two_ranks
from safetensors.torch import load_file

from core.engine.events import Events
from core.engine.modeling import AdapterSpec
from core.engine.spec import parse_spec
from core.engine.train import run_unlearning
from core.errors import JobCancelled, ModelError, SpecError

FULL = AdapterSpec(type="full")


def _rank_processes() -> list[int]:
    """Processes running a rank or the launcher of a sharded job (the tests run alone)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"core.engine.sharded" in command:
            found.append(int(entry.name))
    return found


def _none_left(seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while _rank_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _rank_processes()


@pytest.mark.parametrize(
    ("method_id", "hp"),
    [
        ("npo", {}),  # a reference model, sharded as well
        ("catnip", {"retain_loss": "kl", "sam_rho": 0.05}),  # retain KL; SAM's extra pass
        ("flat", {"gradient_accumulation_steps": 4}),  # a contrast batch; 2 micro-batches each
    ],
)
def test_two_ranks_give_one_process_weights(fixture_dir, tmp_path, method_id, hp):
    """Rank r takes micro-batches r, r+2, ... of each step and FSDP sums the gradients:
    the weights after 4 steps equal a one-process run's to 1e-5, and so does every
    step's reported loss."""
    hp = {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 2, **hp}
    hp["max_grad_norm"] = 1.0  # the clip's norm is over every rank's shard

    def run(sharded: bool):
        wrapped, tok, method, params, forget, retain = setup_run(fixture_dir, FULL, method_id, **hp)
        data = method_data(fixture_dir, tok, method, retain)
        if params.retain_loss != "none":
            data["retain"] = retain
        if sharded:
            result = two_ranks(
                wrapped,
                tok,
                method,
                params,
                forget,
                source=fixture_dir / "model",
                work=tmp_path / "work",
                **data,
            )
        else:
            result = run_unlearning(
                wrapped, method, params, forget, pad_id=tok.pad_token_id, **data
            )
        return wrapped.model.state_dict(), [h.loss for h in result.history]

    one, one_losses = run(sharded=False)
    two, two_losses = run(sharded=True)
    assert len(two_losses) == 4
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    initial = load_file(fixture_dir / "model" / "model.safetensors")
    moved = max(float((one[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3  # the runs changed the weights: equal is not "both untouched"
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-5, msg=name)


def _spec(fixture_dir: Path, path: Path, gpus: int, **hp) -> Path:
    spec = {
        "method": "catnip",
        "base_model": str(fixture_dir / "model"),
        "forget_file": str(fixture_dir / "data" / "forget_qa.jsonl"),
        "adapter": {"type": "full"},
        "resources": {"gpus": gpus},
        "hyperparameters": {
            "max_steps": 150,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-4,
            "checkpoint_every": 5,
            "max_length": 64,
            **hp,
        },
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str | Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "core", "run", *map(str, args)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kwargs
    )


def test_a_killed_sharded_job_resumes_and_finishes(fixture_dir, tmp_path):
    """`unlearn run` of a 2-rank job is SIGKILLed once a checkpoint is sealed: its ranks
    die with it; rerun with 1 device it is refused (the checkpoint is sharded); rerun
    with 2 it resumes there and finishes with the weights of an uninterrupted one-process
    run of the same spec, to 1e-5."""
    out = tmp_path / "out"
    spec = _spec(fixture_dir, tmp_path / "two.yaml", 2)
    job = _cli(spec, "-o", out)
    deadline = time.monotonic() + 240
    while not list((out / "checkpoints").glob("step-*/state.json")):
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "no checkpoint in 240 s"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)  # the job's process alone: nothing signals the ranks
    job.wait()
    assert _none_left(), f"ranks outlived the job: {_rank_processes()}"
    killed_at = max(
        json.loads(p.read_text())["step"] for p in (out / "checkpoints").glob("step-*/state.json")
    )
    assert 0 < killed_at < 150
    assert not (out / "model").exists()

    wrong = _cli(_spec(fixture_dir, tmp_path / "one.yaml", 1), "-o", out)
    _, err = wrong.communicate(timeout=240)
    assert wrong.returncode == 2
    assert "[checkpoint_mismatch]" in err.decode() and "resources.gpus 2" in err.decode()

    again = _cli(spec, "-o", out)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()[-3000:]
    assert f"[resumed] from the checkpoint at step {killed_at}" in err.decode()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == {"done": 150, "planned": 150}
    assert metrics["sharded"]["processes"] == 2 and metrics["sharded"]["backend"] == "gloo"
    peaks = metrics["sharded"]["ranks_peak_memory"]
    assert len(peaks) == 2 and all(p["host_bytes"] > 50e6 for p in peaks)

    straight = _cli(_spec(fixture_dir, tmp_path / "one.yaml", 1), "-o", tmp_path / "straight")
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err.decode()[-3000:]
    expected = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(out / "model" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-5, msg=name)


def _two_ranks(wrapped, method, params, forget, tok, source, tmp_path, events=None):
    return two_ranks(
        wrapped, tok, method, params, forget, source=source, work=tmp_path / "work", events=events
    )


class _CancelAfterFirstStep(Events):
    def __init__(self) -> None:
        self.steps = 0

    def step(self, info) -> None:
        self.steps += 1

    def should_cancel(self) -> bool:
        return self.steps >= 1


def test_a_cancel_stops_the_ranks(fixture_dir, tmp_path):
    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, FULL, "catnip", max_steps=5000, gradient_accumulation_steps=2
    )
    events = _CancelAfterFirstStep()
    with pytest.raises(JobCancelled):
        _two_ranks(wrapped, method, params, forget, tok, fixture_dir / "model", tmp_path, events)
    assert events.steps >= 1
    assert _none_left(), f"ranks outlived the cancel: {_rank_processes()}"


def test_a_rank_error_is_raised_as_it_was(fixture_dir, tmp_path):
    """The ranks load the starting weights themselves; a ModelError there is the job's."""
    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, FULL, "catnip", gradient_accumulation_steps=2
    )
    with pytest.raises(ModelError, match="no config.json"):
        _two_ranks(wrapped, method, params, forget, tok, tmp_path / "nowhere", tmp_path)
    assert _none_left()


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"adapter": {"type": "lora"}}, "resources.gpus", "full-weight jobs"),
        ({"adapter": {"type": "full", "layers": [0]}}, "resources.gpus", "full-weight jobs"),
        (
            {"method": "rmu_star", "hyperparameters": {"gradient_accumulation_steps": 2}},
            "resources.gpus",
            "fits one device",
        ),
        (
            {"hyperparameters": {"gradient_accumulation_steps": 3}},
            "hyperparameters.gradient_accumulation_steps",
            "multiple of 2",
        ),
    ],
)
def test_what_cannot_be_sharded_is_refused_by_the_spec(change, param, says):
    raw = {
        "method": "catnip",
        "base_model": "m",
        "forget_file": "f.jsonl",
        "adapter": {"type": "full"},
        "resources": {"gpus": 2},
        "hyperparameters": {"gradient_accumulation_steps": 2},
        **change,
    }
    with pytest.raises(SpecError, match=says) as caught:
        parse_spec(raw)
    assert caught.value.param == param
