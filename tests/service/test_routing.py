"""Worker classes on the stack (Postgres, Redis, separate Celery workers): each job runs
on a worker of the class its memory needs, and a job that no class can run is refused
at submission. The classes are sized for the test fixture (about 70k parameters)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from api.client import APIError, Client
from tests.service.conftest import ROOT, cli, free_port, stop_process_group, wait_http
from tests.service.flow import upload

pytestmark = pytest.mark.slow

# A LoRA job on the fixture needs about 0.0002 GB, a full-weight one about 0.0015 GB.
CLASSES = {"small": 0.0005, "large": 0.01}


def test_each_job_runs_on_a_worker_of_its_class(migrated_pg, redis_url, fixture_dir, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": migrated_pg,
        "BROKER_URL": redis_url,
        "UNLEARN_DATA_DIR": str(tmp_path / "state"),
        "TASK_QUEUE": "unlearn-routing-test",
        "WORKER_CLASSES": json.dumps(CLASSES),
        "WORKER_DEVICE": "cpu",
        "WORKER_THREADS": "1",
    }
    assert "parameters)" in cli(env, "models", "add", "tiny-routed", str(fixture_dir / "model"))
    cli(env, "models", "add", "tiny-huge", str(fixture_dir / "model"), "--needs-gb", "5")
    key = cli(env, "keys", "create", "--tenant", "routing").strip().splitlines()[-1]
    # a worker must name one of the classes
    wrong = subprocess.run(
        [sys.executable, "-m", "api", "worker", "--class", "medium"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 2 and "one of them" in wrong.stderr, wrong.stderr
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "api", "serve", "--port", str(port), "--no-with-worker"],
            env=env,
            cwd=ROOT,
        )
    ]
    logs = {}
    for name in CLASSES:
        logs[name] = tmp_path / f"worker-{name}.log"
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "api", "worker", "--class", name],
                env=env,
                cwd=ROOT,
                start_new_session=True,
                stdout=logs[name].open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", processes[0])
        with Client(f"http://127.0.0.1:{port}", key) as client:
            forget = upload(client, fixture_dir / "data" / "forget_qa.jsonl", "forget")
            base = {
                "method": "catnip",
                "base_model": "tiny-routed",
                "forget_file": forget,
                "hyperparameters": {"max_steps": 2, "batch_size": 8, "max_length": 64},
            }
            lora = client.submit_job({**base, "adapter": {"type": "lora", "r": 4}})
            full = client.submit_job({**base, "adapter": {"type": "full"}})
            assert (lora["worker_class"], full["worker_class"]) == ("small", "large")
            with pytest.raises(APIError) as refused:
                client.submit_job({**base, "base_model": "tiny-huge"})
            assert refused.value.status == 422 and refused.value.code == "no_worker_class"
            assert "'large', has 0.01 GB" in refused.value.message
            ran_on = {}
            for job in (lora, full):
                done = client.wait(job["id"], timeout=240)
                assert done["status"] == "succeeded", done
                running = [
                    e["data"]
                    for e in client.events(job["id"])
                    if e["type"] == "status" and (e["data"] or {}).get("status") == "running"
                ]
                ran_on[job["worker_class"]] = running[-1]
            assert {c: r["worker_class"] for c, r in ran_on.items()} == {
                "small": "small",
                "large": "large",
            }
            assert ran_on["small"]["worker"] != ran_on["large"]["worker"]
            assert not list(client.list_jobs(status="queued"))  # none left waiting
    finally:
        processes[0].send_signal(signal.SIGINT)
        processes[0].wait(30)
        for worker in processes[1:]:
            stop_process_group(worker)
