"""The user's path through the API, shared by the end-to-end tests of both modes:
upload, submit, poll, events, metrics, download, load the adapter with peft."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


def upload(client: Any, path: Path, purpose: str) -> str:
    with path.open("rb") as handle:
        response = client.post(
            "/v1/files", data={"purpose": purpose}, files={"file": (path.name, handle)}
        )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "valid", response.json()
    return response.json()["id"]


def wait_for(
    client: Any, job_id: str, until: Any, timeout: float = 300, every: float = 0.2
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(every)
    raise AssertionError(f"job {job_id} did not reach the state in {timeout}s: {job}")


def lora_job(client: Any, data: Path, *, forget_path: Path | None = None, **hyper: Any) -> dict:
    forget = upload(client, forget_path or data / "forget_qa.jsonl", "forget")
    body = {
        "method": "catnip",
        "base_model": "tiny",
        "forget_file": forget,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "hyperparameters": {
            "learning_rate": 1e-2,
            "max_steps": 6,
            "batch_size": 16,
            "max_length": 64,
            **hyper,
        },
        "eval": {
            "forget_qa": upload(client, data / "forget_qa.jsonl", "eval"),
            "retain_qa": upload(client, data / "retain_qa.jsonl", "eval"),
            "max_samples": 60,
            "probe_every": 2,
            "probe_samples": 40,
            "utility_budget": 1.0,
        },
    }
    response = client.post(
        "/v1/jobs", json=body, headers={"Idempotency-Key": f"e2e-{time.time_ns()}"}
    )
    assert response.status_code == 201, response.text
    return response.json()


def check_succeeded_job(client: Any, job: dict, fixture_dir: Path, out: Path) -> dict:
    """Events, metrics and the adapter of a finished job, checked as a user would."""
    import hashlib
    import io
    import tarfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.engine.evaluation import knowmem
    from core.engine.formats import load_records

    assert job["status"] == "succeeded", job
    assert (
        job["progress"]["step"] == job["progress"]["total_steps"]
        or job["metrics_summary"]["stop_rule"]
    )
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    phases = [e["data"]["phase"] for e in events if e["type"] == "phase"]
    assert phases[:3] == ["validating", "loading", "evaluating_before"], phases
    assert "unlearning" in phases and phases[-3:] == ["evaluating_after", "saving", "uploading"], (
        phases
    )
    assert any(e["type"] == "step" for e in events)
    assert [e["data"]["status"] for e in events if e["type"] == "status"][-1] == "succeeded"

    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"]
    assert metrics["before"]["forget_knowmem"]["rouge_l_f1"] > 0.9
    assert (
        metrics["after"]["forget_knowmem"]["rouge_l_f1"]
        < metrics["before"]["forget_knowmem"]["rouge_l_f1"]
    )

    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert set(artifacts) == {"adapter", "report"}, artifacts
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/adapter", follow_redirects=True)
    assert response.status_code == 200
    assert len(response.content) == artifacts["adapter"]["bytes"]
    assert hashlib.sha256(response.content).hexdigest() == artifacts["adapter"]["sha256"]
    adapter_dir = out / "adapter"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(adapter_dir, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter_dir.iterdir()
    }

    # The downloaded adapter loads with peft and changes the answers on the forget set.
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(fixture_dir / "model").eval()
    questions = load_records(fixture_dir / "data" / "forget_qa.jsonl").items[:60]
    with torch.no_grad():
        before = knowmem(base, tokenizer, questions)["rouge_l_f1"]
        unlearned = PeftModel.from_pretrained(base, adapter_dir).eval()
        after = knowmem(unlearned, tokenizer, questions)["rouge_l_f1"]
    assert before > 0.9 and after < before - 0.05, (before, after)
    return {"events": events, "metrics": metrics, "artifacts": artifacts}
