"""The user's path through the API, shared by the end-to-end tests of both modes:
upload, submit, poll, events, metrics, download, load the adapter with peft."""

from __future__ import annotations

import json
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


def lora_job(
    client: Any,
    data: Path,
    *,
    forget_path: Path | None = None,
    init_from_job: str | None = None,
    **hyper: Any,
) -> dict:
    forget = upload(client, forget_path or data / "forget_qa.jsonl", "forget")
    body: dict[str, Any] = {
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
            "holdout": upload(client, data / "holdout_qa.jsonl", "eval"),
            "criteria": {"forget_knowmem_max_ratio": 0.95, "utility_min_ratio": 0.5},
        },
    }
    if init_from_job is not None:
        body["init_from_job"] = init_from_job
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
    assert "unlearning" in phases and phases[-4:] == [
        "evaluating_after",
        "auditing",
        "saving",
        "uploading",
    ], phases
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
    assert {"adapter_config.json", "adapter_model.safetensors", "provenance.json"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    # it names the registered base model, not the worker's directory, and says what made it
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny", config
    provenance = json.loads((adapter_dir / "provenance.json").read_text())
    assert provenance["job"] == job["id"] and provenance["base_model"]["name"] == "tiny"
    assert provenance["base_model"]["digest"].startswith("sha256:")

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


def check_no_local_paths(client: Any, job: dict, paths: list[Path]) -> int:
    """No file of any of the job's archives holds one of `paths` (the operator's and the
    worker's directories). Returns how many files were read."""
    import io
    import tarfile

    secrets = [str(p).encode() for p in paths]
    read = 0
    for artifact in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]:
        response = client.get(
            f"/v1/jobs/{job['id']}/artifacts/{artifact['name']}", follow_redirects=True
        )
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                content = handle.read()
                read += 1
                for secret in secrets:
                    assert secret not in content, (
                        f"{artifact['name']}/{member.name} holds {secret!r}"
                    )
    return read


def check_sequential_job(
    client: Any, first: dict, first_metrics: dict, fixture_dir: Path, out: Path
) -> None:
    """A second job from `first`'s output, as the next deletion request arrives: it starts
    where the first ended, records its chain (job, metrics, report, certificate), and its
    one adapter loads on the base model and answers as the job measured."""
    import hashlib
    import io
    import tarfile

    import pytest
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.engine.evaluation import knowmem
    from core.engine.formats import load_records

    second = lora_job(client, fixture_dir / "data", init_from_job=first["id"], learning_rate=3e-3)
    assert (second["init_from_job"], second["chain"]) == (first["id"], [first["id"]])
    second = wait_for(client, second["id"], lambda j: j["status"] in TERMINAL, timeout=300)
    assert second["status"] == "succeeded", second
    metrics = client.get(f"/v1/jobs/{second['id']}/metrics").json()["metrics"]
    first_artifacts = client.get(f"/v1/jobs/{first['id']}/artifacts").json()["data"]
    first_adapter = next(a["sha256"] for a in first_artifacts if a["name"] == "adapter")
    assert metrics["chain"] == [
        {"job": first["id"], "method": "catnip", "output": "adapter", "sha256": first_adapter}
    ]
    assert metrics["before"]["forget_knowmem"]["rouge_l_f1"] == pytest.approx(
        first_metrics["after"]["forget_knowmem"]["rouge_l_f1"], abs=0.01
    ), "the second job did not start from the first one's output"

    def download(name: str) -> Path:
        response = client.get(f"/v1/jobs/{second['id']}/artifacts/{name}", follow_redirects=True)
        assert response.status_code == 200, response.text
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            tar.extractall(out / name, filter="data")
        return out / name

    summary = (download("report") / "summary.md").read_text()
    assert f"- Starts from: `{first['id']}` (catnip)'s output (adapter)" in summary
    adapter_dir = download("adapter")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 16
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    questions = load_records(fixture_dir / "data" / "forget_qa.jsonl").items[:60]
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, adapter_dir).eval()
        measured = knowmem(loaded, tokenizer, questions)["rouge_l_f1"]
    assert measured == pytest.approx(metrics["after"]["forget_knowmem"]["rouge_l_f1"], abs=0.01)

    certificate = json.loads(client.get(f"/v1/jobs/{second['id']}/certificate").content)
    starts = certificate["starts_from"]
    assert starts["job"] == first["id"] and starts["chain"] == [first["id"]]
    assert starts["artifacts"]["adapter"] == first_adapter
    first_certificate = client.get(f"/v1/jobs/{first['id']}/certificate").content
    assert starts["certificate_sha256"] == hashlib.sha256(first_certificate).hexdigest()


def check_evidence(client: Any, job: dict, out: Path, env: dict, tenant: str) -> dict:
    """A succeeded job's evidence, checked as a sceptic would: the verdict against the
    declared criteria, the attacks and membership inference run, the certificate
    verified offline with the published key (and the downloaded adapter against it),
    and the tenant's audit trail, whose chain `unlearn audit verify` finds intact."""
    import subprocess
    import sys

    import httpx

    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"]
    assert [r["criterion"] for r in metrics["criteria"]] == [
        "forget_knowmem_max_ratio",
        "utility_min_ratio",
    ]
    expected = "pass" if all(r["passed"] for r in metrics["criteria"]) else "fail"
    assert (
        metrics["verdict"]
        == expected
        == client.get(f"/v1/jobs/{job['id']}").json()["metrics_summary"]["verdict"]
    )
    assert metrics["robustness"]["relearn"]["status"] == "done"
    assert metrics["robustness"]["quantization"]["status"] == "done"
    assert (
        metrics["privacy"]["after"]["status"] == "done"
        and 0 <= metrics["privacy"]["after"]["min_k_auc"] <= 1
    )

    out.mkdir(parents=True, exist_ok=True)
    certificate = client.get(f"/v1/jobs/{job['id']}/certificate")
    assert certificate.status_code == 200, certificate.text
    (out / "certificate.json").write_bytes(certificate.content)
    keys = httpx.get(
        str(client.base_url).rstrip("/") + "/v1/signing-keys"
    )  # published: no key needed
    assert keys.status_code == 200 and keys.json()["data"], keys.text
    (out / "keys.json").write_text(keys.text)
    adapter = client.get(f"/v1/jobs/{job['id']}/artifacts/adapter", follow_redirects=True)
    (out / "adapter.tar.gz").write_bytes(adapter.content)
    content = json.loads(certificate.content)
    assert content["job"]["id"] == job["id"] and content["verdict"] == metrics["verdict"]
    assert content["base_model"]["name"] == "tiny" and content["base_model"]["digest"].startswith(
        "sha256:"
    )
    assert content["inputs"]["forget_file"]["sha256"] and content["spec"]["method"] == "catnip"

    def unlearn(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "api", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = unlearn(
        "verify",
        str(out / "certificate.json"),
        "--keys",
        str(out / "keys.json"),
        "--artifact",
        str(out / "adapter.tar.gz"),
    )
    assert ok.returncode == 0 and f"valid: job {job['id']}" in ok.stdout, ok.stdout + ok.stderr
    tampered = certificate.content.replace(b'"verdict":"', b'"verdict":"x')
    (out / "tampered.json").write_bytes(tampered)
    bad = unlearn("verify", str(out / "tampered.json"), "--keys", str(out / "keys.json"))
    assert bad.returncode == 1 and "INVALID" in bad.stderr, bad.stderr

    entries = client.get("/v1/audit", params={"limit": 1000}).json()["data"]
    actions = [e["action"] for e in entries if e["subject"] == job["id"]]
    for action in (
        "job.created",
        "job.running",
        "job.succeeded",
        "artifact.downloaded",
        "certificate.downloaded",
    ):
        assert action in actions, actions
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    intact = unlearn("audit", "verify", "--tenant", tenant, "--head", entries[-1]["hash"])
    assert intact.returncode == 0 and "audit log intact" in intact.stdout, (
        intact.stdout + intact.stderr
    )
    return metrics


def sse_events(response: Any, until: Any = None) -> list[dict[str, str]]:
    """The events of a text/event-stream response, each {id, event, data} as sent (comments
    skipped), read until the stream ends or `until(event)` is true (the caller then
    leaves, as a client that disconnects)."""
    events: list[dict[str, str]] = []
    event: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if event:
                events.append(event)
                if until is not None and until(event):
                    return events
            event = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        event[field] = value.removeprefix(" ")
    return events
