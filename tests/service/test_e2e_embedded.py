"""End to end in the embedded default, as a new user runs it: `unlearn models add`,
`unlearn keys create`, `unlearn serve` (SQLite, local store, the server-less queue and
a worker started by the same command), then the API over real HTTP with the Python
client and the tenant CLI (`unlearn jobs wait|download`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from api.client import Client
from tests.service.conftest import ROOT, cli, embedded_env, free_port, wait_http
from tests.service.flow import (
    check_evidence,
    check_no_local_paths,
    check_succeeded_job,
    lora_job,
    sse_events,
)

pytestmark = pytest.mark.slow


def test_embedded_service_end_to_end(fixture_dir, tmp_path):
    env = embedded_env(tmp_path / "state", AUTH_CACHE_SECONDS="1", LOG_FORMAT="json")
    assert "registered model 'tiny'" in cli(
        env, "models", "add", "tiny", str(fixture_dir / "model")
    )
    key = cli(env, "keys", "create", "--tenant", "acme").strip().splitlines()[-1]
    assert key.startswith("ul_")
    assert (tmp_path / "state" / "unlearn.db").is_file()

    port = free_port()
    log_path = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", server)
        with Client(f"http://127.0.0.1:{port}", key) as client:
            # the forget set has one record whose prompt fills max_length (64 tokens)
            lines = (fixture_dir / "data" / "forget_qa.jsonl").read_text().splitlines()
            lines.insert(
                4, json.dumps({"prompt": "Q: " + "dragon " * 70 + "?\nA:", "response": " no."})
            )
            (tmp_path / "forget.jsonl").write_text("\n".join(lines) + "\n")
            job = lora_job(client, fixture_dir / "data", forget_path=tmp_path / "forget.jsonl")
            # Prometheus sees the job while it is queued or running.
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            active = [
                line
                for line in scraped.splitlines()
                if line.startswith(
                    ('unlearn_jobs{status="queued"}', 'unlearn_jobs{status="running"}')
                )
            ]
            assert sum(float(line.split()[-1]) for line in active) == 1.0, active
            # Followed live over SSE: a client leaves after two events and comes back with
            # Last-Event-ID; it misses none and sees none twice, to the `end` event.
            url = f"/v1/jobs/{job['id']}/events/stream"
            with client.http.stream("GET", url) as response:
                head = sse_events(response, until=lambda e: e.get("id") == "2")
            last = {"Last-Event-ID": head[-1]["id"]}
            with client.http.stream("GET", url, headers=last) as response:
                tail = sse_events(response)
            assert tail[-1]["event"] == "end", tail[-3:]
            assert json.loads(tail[-1]["data"]) == {"status": "succeeded"}
            listed = list(client.events(job["id"]))
            assert [e["id"] for e in head + tail[:-1]] == [e["id"] for e in listed]
            assert any(e["event"] == "step" for e in tail)
            job = client.wait(job["id"], timeout=300)
            result = check_succeeded_job(client, job, fixture_dir, tmp_path / "download")
            check_evidence(client, job, tmp_path / "evidence", env, "acme")
            assert any(e["type"] == "probe" for e in result["events"])
            warnings = [e["message"] for e in result["events"] if e["type"] == "warning"]
            assert len(warnings) == 1 and "will not be unlearned (lines 5)" in warnings[0], warnings
            assert result["metrics"]["data"]["forget"]["skipped"] == {"count": 1, "lines": [5]}
            # The report names the model and the forget file as the tenant knows them, not
            # by the operator's or the worker's paths.
            # ... downloaded by the tenant CLI, which also waits on the finished job
            tenant = {
                "PATH": os.environ["PATH"],
                "UNLEARN_API_URL": client.base_url,
                "UNLEARN_API_KEY": key,
            }
            waited = subprocess.run(
                [sys.executable, "-m", "api", "jobs", "wait", job["id"]],
                env=tenant,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert waited.returncode == 0 and f"{job['id']} succeeded" in waited.stderr
            downloaded = cli(
                tenant, "jobs", "download", job["id"], "-a", "report", "--out", str(tmp_path)
            )
            assert downloaded.split() == ["report", str(tmp_path / job["id"] / "report")]
            summary = (tmp_path / job["id"] / "report" / "summary.md").read_text()
            assert "- Base model: `tiny`" in summary
            assert f"- Forget set: `{job['forget_file']} (forget.jsonl)`" in summary
            assert str(tmp_path) not in summary and str(fixture_dir) not in summary
            secrets = [tmp_path, fixture_dir, ROOT]
            assert check_no_local_paths(client, job, secrets, tmp_path / "archives") >= 8
            assert job["attempts"] == 1
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert 'unlearn_jobs{status="succeeded"} 1.0' in scraped
            assert 'unlearn_job_stage_seconds_count{stage="unlearn"} 1.0' in scraped
            assert "unlearn_job_queue_seconds_count 1.0" in scraped
            assert 'unlearn_job_tokens_per_second_count{device="cpu"} 1.0' in scraped
            host = 'unlearn_job_peak_memory_bytes{device="cpu",kind="host"} '
            assert (
                float(next(x for x in scraped.splitlines() if x.startswith(host)).split()[-1]) > 1e8
            )
            polls = (
                'unlearn_http_request_duration_seconds_count{method="GET",'
                'route="/v1/jobs/{job_id}",status="200"}'
            )
            assert (
                float(next(x for x in scraped.splitlines() if x.startswith(polls)).split()[-1]) > 1
            )
        # An operator revokes the key: after the verification cache (AUTH_CACHE_SECONDS) it is refused.
        key_id = next(
            line.split("\t")[0]
            for line in cli(env, "keys", "list", "--tenant", "acme").splitlines()
        )
        assert "revoked" in cli(env, "keys", "revoke", key_id)
        assert "\trevoked " in cli(env, "keys", "list")
        deadline = (
            time.monotonic() + 10
        )  # AUTH_CACHE_SECONDS=1: refused once the cache entry expires
        while (
            refused := httpx.get(
                f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {key}"}
            )
        ).status_code == 200:
            assert time.monotonic() < deadline, "a revoked key was still accepted"
            time.sleep(0.1)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    # The job's whole path in the JSON logs of the API and of the worker, by its id.
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("job_id") == job["id"]]
    loggers = {line["logger"] for line in mine}
    assert {"api.access", "api.services.jobs", "worker.runner", "worker.tasks"} <= loggers, loggers
    created = next(line for line in mine if line["logger"] == "api.services.jobs")
    assert created["tenant"] == "acme" and created["request_id"] and created["key_id"]
    access = [line for line in mine if line["logger"] == "api.access"]
    assert all(line["tenant"] == "acme" and line["request_id"] for line in access)
    assert any(line["message"].startswith(f"GET /v1/jobs/{job['id']} 200") for line in access)
    # Everything lived under UNLEARN_DATA_DIR: the database, the queue and the artifacts.
    assert (tmp_path / "state" / "broker.db").is_file()
    assert list((tmp_path / "state" / "store" / "jobs").rglob("adapter.tar.gz"))  # small: gzipped
