"""The user's path through the API with the Python client (api.client), shared by the
end-to-end tests of both modes: upload, submit, follow, events, metrics, download, load
the adapter with peft."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from api.client import TERMINAL, Client
from core.engine.evaluation import PER_RECORD

__all__ = ["TERMINAL"]


def record_of(certificate: bytes) -> dict:
    """The unlearning record a certificate carries: the predicate of the in-toto statement
    in its DSSE envelope (read, not verified: `unlearn verify` verifies)."""
    import base64

    return json.loads(base64.b64decode(json.loads(certificate)["payload"]))["predicate"]


def upload(client: Client, path: Path, purpose: str) -> str:
    file = client.upload_file(path, purpose)
    assert file["status"] == "valid", file
    return file["id"]


def wait_for(
    client: Client, job_id: str, until: Any, timeout: float = 300, every: float = 0.2
) -> Any:
    """Poll until `until(job)` holds (for states between the events, e.g. a step reached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if until(job):
            return job
        time.sleep(every)
    raise AssertionError(f"job {job_id} did not reach the state in {timeout}s: {job}")


def lora_job(
    client: Client,
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
    return client.submit_job(body)


def check_succeeded_job(client: Client, job: Any, fixture_dir: Path, out: Path) -> dict:
    """Events, metrics and the adapter of a finished job, checked as a user would."""
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
    events = list(client.events(job["id"]))
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

    metrics = client.metrics(job["id"])
    assert metrics is not None
    assert metrics["before"]["forget_knowmem"]["rouge_l_f1"] > 0.9
    assert (
        metrics["after"]["forget_knowmem"]["rouge_l_f1"]
        < metrics["before"]["forget_knowmem"]["rouge_l_f1"]
    )

    artifacts = {a["name"]: a for a in client.artifacts(job["id"])}
    assert set(artifacts) == {"adapter", "report"}, artifacts
    # downloaded with its sha256 checked against the one the service recorded
    adapter_dir = client.download_artifact(job["id"], "adapter", out)
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


def check_no_local_paths(client: Client, job: Any, paths: list[Path], out: Path) -> int:
    """No file of any of the job's archives holds one of `paths` (the operator's and the
    worker's directories). Returns how many files were read."""
    import tarfile

    secrets = [str(p).encode() for p in paths]
    read = 0
    for artifact in client.artifacts(job["id"]):
        archive = client.download_artifact(job["id"], artifact["name"], out, unpack=False)
        with tarfile.open(archive) as tar:
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
    client: Client,
    first: Any,
    first_metrics: dict,
    fixture_dir: Path,
    out: Path,
    *,
    model_cache: str = "off",
) -> None:
    """A second job from `first`'s output, as the next deletion request arrives: it starts
    where the first ended, records its chain (job, metrics, report, certificate), and its
    one adapter loads on the base model and answers as the job measured."""
    import hashlib

    import pytest
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.engine.evaluation import knowmem
    from core.engine.formats import load_records

    second = lora_job(client, fixture_dir / "data", init_from_job=first["id"], learning_rate=3e-3)
    assert (second["init_from_job"], second["chain"]) == (first["id"], [first["id"]])
    second = client.wait(second["id"], timeout=300)
    assert second["status"] == "succeeded", second
    metrics = client.metrics(second["id"])
    assert metrics is not None
    first_artifacts = client.artifacts(first["id"])
    first_adapter = next(a["sha256"] for a in first_artifacts if a["name"] == "adapter")
    assert metrics["chain"] == [
        {"job": first["id"], "method": "catnip", "output": "adapter", "sha256": first_adapter}
    ]
    assert metrics["before"]["forget_knowmem"]["rouge_l_f1"] == pytest.approx(
        first_metrics["after"]["forget_knowmem"]["rouge_l_f1"], abs=0.01
    ), "the second job did not start from the first one's output"
    # from the worker's warm cache where it has one: the start is the same
    assert metrics["model_cache"]["cache"] == model_cache, metrics["model_cache"]

    summary = (client.download_artifact(second["id"], "report", out) / "summary.md").read_text()
    assert f"- Starts from: `{first['id']}` (catnip)'s output (adapter)" in summary
    adapter_dir = client.download_artifact(second["id"], "adapter", out)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 16
    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    questions = load_records(fixture_dir / "data" / "forget_qa.jsonl").items[:60]
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, adapter_dir).eval()
        measured = knowmem(loaded, tokenizer, questions)["rouge_l_f1"]
    assert measured == pytest.approx(metrics["after"]["forget_knowmem"]["rouge_l_f1"], abs=0.01)

    starts = record_of(client.certificate(second["id"]))["starts_from"]
    assert starts["job"] == first["id"] and starts["chain"] == [first["id"]]
    assert starts["artifacts"]["adapter"] == first_adapter
    first_certificate = client.certificate(first["id"])
    assert starts["certificate_sha256"] == hashlib.sha256(first_certificate).hexdigest()


def check_evidence(client: Client, job: Any, out: Path, env: dict, tenant: str) -> dict:
    """A succeeded job's evidence, checked as a sceptic would: the verdict against the
    declared criteria, the attacks and membership inference run, the certificate
    verified offline with the published key (and the downloaded adapter against it),
    and the tenant's audit trail, whose chain `unlearn audit verify` finds intact."""
    import base64
    import subprocess
    import sys

    import httpx

    metrics = client.metrics(job["id"])
    assert metrics is not None
    assert [r["criterion"] for r in metrics["criteria"]] == [
        "forget_knowmem_max_ratio",
        "utility_min_ratio",
    ]
    expected = "pass" if all(r["passed"] for r in metrics["criteria"]) else "fail"
    assert metrics["verdict"] == expected == client.get_job(job["id"])["metrics_summary"]["verdict"]
    assert metrics["robustness"]["relearn"]["status"] == "done"
    quantization = metrics["robustness"]["quantization"]
    assert quantization["status"] == "done"
    assert quantization["baseline"]["unquantized_from"].startswith("the after evaluation")
    assert not any(f'"{key}"' in json.dumps(metrics) for key in PER_RECORD)  # never stored
    assert (
        metrics["privacy"]["after"]["status"] == "done"
        and 0 <= metrics["privacy"]["after"]["min_k_auc"] <= 1
    )

    out.mkdir(parents=True, exist_ok=True)
    certificate = client.certificate(job["id"])
    (out / "certificate.json").write_bytes(certificate)
    keys = httpx.get(client.base_url + "/v1/signing-keys")  # published: no key needed
    assert keys.status_code == 200 and keys.json()["data"] == client.signing_keys(), keys.text
    (out / "keys.json").write_text(keys.text)
    adapter = client.download_artifact(job["id"], "adapter", out, unpack=False)
    content = record_of(certificate)
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
        str(adapter),
    )
    assert ok.returncode == 0 and f"valid: job {job['id']}" in ok.stdout, ok.stdout + ok.stderr
    assert "in-toto attestation" in ok.stdout, ok.stdout
    # the unpacked adapter against its model signature (model.sig, OpenSSF model signing)
    unpacked = client.download_artifact(job["id"], "adapter", out / "unpacked")
    signed = unlearn(
        "verify",
        str(out / "certificate.json"),
        "--keys",
        str(out / "keys.json"),
        "--model-dir",
        str(unpacked),
    )
    assert signed.returncode == 0 and "every file as signed" in signed.stdout, signed.stderr
    envelope = json.loads(certificate)
    payload = base64.b64decode(envelope["payload"]).replace(b'"verdict":"', b'"verdict":"x')
    envelope["payload"] = base64.b64encode(payload).decode()
    tampered = json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()
    (out / "tampered.json").write_bytes(tampered)
    bad = unlearn("verify", str(out / "tampered.json"), "--keys", str(out / "keys.json"))
    assert bad.returncode == 1 and "INVALID" in bad.stderr, bad.stderr

    entries = list(client.audit())
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
    # The certificate's head, recorded before the downloads: the log grew past it.
    at_issue = content["audit_head"]
    assert at_issue != entries[-1]["hash"]
    grown = unlearn("audit", "verify", "--tenant", tenant, "--head", at_issue)
    assert grown.returncode == 0 and "audit log intact" in grown.stdout, grown.stderr
    nobody = unlearn("audit", "verify", "--tenant", "nobody-at-all")
    assert nobody.returncode == 2 and "no tenant 'nobody-at-all'" in nobody.stderr
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
