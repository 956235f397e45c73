"""A robust job over REST on the embedded default (`unlearn serve`, the Python client):
`"profile": "robust"` fills in a KL retain term, selective updates and the distillation
stage; a field the submission names wins; the certificate names the profile and every
stage; a robust submission without its distillation set is refused at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api.client import APIError, Client
from tests.service.conftest import ROOT, cli, embedded_env, free_port, wait_http
from tests.service.flow import record_of, upload

pytestmark = pytest.mark.slow


def test_a_robust_profile_job_over_rest(fixture_dir, tmp_path):
    env = embedded_env(tmp_path / "state")
    cli(env, "models", "add", "tiny", str(fixture_dir / "model"))
    key = cli(env, "keys", "create", "--tenant", "acme").strip().splitlines()[-1]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=(tmp_path / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    data = fixture_dir / "data"
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", server)
        with Client(f"http://127.0.0.1:{port}", key) as client:
            body = {
                "profile": "robust",
                "method": "catnip",
                "base_model": "tiny",
                "forget_file": upload(client, data / "forget_qa.jsonl", "forget"),
                "retain_file": upload(client, data / "retain_qa.jsonl", "retain"),
                "adapter": {"type": "lora", "r": 4},
                "hyperparameters": {"learning_rate": 1e-2, "max_steps": 3, "batch_size": 8},
                "eval": {
                    "forget_qa": upload(client, data / "forget_qa.jsonl", "eval"),
                    "retain_qa": upload(client, data / "retain_qa.jsonl", "eval"),
                    "max_samples": 40,
                    "probe_samples": 20,
                    "utility_budget": 0.0,
                },
            }
            with pytest.raises(APIError) as refused:
                client.submit_job(body)
            assert refused.value.status == 422 and refused.value.param == "distill_file"
            assert "profile" in refused.value.message
            body["distill_file"] = upload(client, data / "retain_text.jsonl", "distill")
            body["robustify"] = {"steps": 12, "probe_every": 6}
            job = client.wait(client.submit_job(body)["id"], timeout=600)
            assert job["status"] == "succeeded", job
            names = {a["name"] for a in client.artifacts(job["id"])}
            assert "model" in names and "adapter" not in names  # distilled: full weights
            record = record_of(client.certificate(job["id"]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert record["profile"] == "robust"
    unlearning, distillation = record["stages"]
    assert unlearning["stage"] == "unlearning" and unlearning["method"] == "catnip"
    assert unlearning["retain_loss"] == "kl" and unlearning["selective"]["mode"] == "project"
    assert unlearning["steps"]["done"] >= 1
    assert distillation["stage"] == "distillation"
    # the profile's defaults under the submission's own fields
    assert distillation["options"]["alpha"] == 0.6 and distillation["options"]["steps"] == 12
    assert 1 <= distillation["steps"]["done"] <= 12
    assert distillation["output"] == "full weights"
