"""End to end on the production stack: Postgres, Redis, an S3-compatible server over
HTTP (moto), the API (`unlearn serve --no-with-worker`) and separate Celery worker
processes (`unlearn worker`, prefork). Also: a worker SIGKILLed mid-job, and duplicate
deliveries."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from api.client import Client
from tests.service.conftest import ROOT, cli, free_port, stop_process_group, wait_http
from tests.service.flow import (
    check_evidence,
    check_sequential_job,
    check_succeeded_job,
    lora_job,
    upload,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(migrated_pg, redis_url, s3_server, fixture_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    env = {
        **os.environ,
        **s3_server,
        "DATABASE_URL": migrated_pg,
        "BROKER_URL": redis_url,
        "UNLEARN_DATA_DIR": str(state),
        "TASK_QUEUE": "unlearn-stack-test",
        "WORKER_THREADS": "2",
        "WORKER_DEVICE": "cpu",
        "EVENT_MIN_INTERVAL_SECONDS": "0.1",
        "LEASE_SECONDS": "4",
        "HEARTBEAT_SECONDS": "0.5",
        "REAP_EVERY_SECONDS": "1",
        "REQUEUE_AFTER_SECONDS": "3",
        # the adapter (about 70 kB) is stored as weights are: a plain .tar
        "ARCHIVE_GZIP_MAX_BYTES": "20000",
        # the worker keeps the base model between jobs: the sequential job starts from it
        "MODEL_CACHE_BYTES": str(1 << 30),
    }
    cli(env, "models", "add", "tiny", str(fixture_dir / "model"))
    key = cli(env, "keys", "create", "--tenant", "stack").strip().splitlines()[-1]
    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port), "--no-with-worker"],
        env=env,
        cwd=ROOT,
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", api)
    client = Client(f"http://127.0.0.1:{port}", key)
    yield {"env": env, "client": client, "state": state}
    client.close()
    api.send_signal(signal.SIGINT)
    api.wait(30)


def wait_until_consumed(broker_url: str, queue: str, timeout: float = 60) -> None:
    """The queue is empty and no message is delivered-but-unacked (kombu's Redis `unacked`)."""
    import redis

    broker = redis.Redis.from_url(broker_url)
    deadline = time.monotonic() + timeout
    while broker.llen(queue) or broker.hlen("unacked"):
        assert time.monotonic() < deadline, "the broker still holds messages"
        time.sleep(0.1)


def start_worker(env: dict) -> subprocess.Popen:
    # A session of its own, so the test can SIGKILL the prefork parent and its child together.
    return subprocess.Popen(
        [sys.executable, "-m", "api", "worker"], env=env, cwd=ROOT, start_new_session=True
    )


def test_stack_end_to_end_with_s3_and_a_duplicate_delivery(stack, fixture_dir, tmp_path):
    from celery import Celery

    client = stack["client"]
    assert client.http.get("/readyz").json()["checks"] == {
        "database": "ok",
        "storage": "ok",
        "broker": "ok",
    }
    worker = start_worker(stack["env"])
    try:
        job = lora_job(client, fixture_dir / "data")
        wait_for(client, job["id"], lambda j: j["status"] != "queued", timeout=120)
        # The broker delivers the same id again while the job runs: it must not run twice.
        sender = Celery(broker=stack["env"]["BROKER_URL"])
        sender.send_task("unlearn.run_job", args=[job["id"]], queue=stack["env"]["TASK_QUEUE"])
        job = client.wait(job["id"], timeout=300)
        result = check_succeeded_job(client, job, fixture_dir, tmp_path)
        check_evidence(client, job, tmp_path / "evidence", stack["env"], "stack")
        wait_until_consumed(stack["env"]["BROKER_URL"], stack["env"]["TASK_QUEUE"])
        job = client.get_job(job["id"])
        assert job["attempts"] == 1 and job["status"] == "succeeded"
        running = [
            e
            for e in client.events(job["id"])
            if e["type"] == "status" and (e["data"] or {})["status"] == "running"
        ]
        assert len(running) == 1
        # On S3 the download is a redirect to a short-lived presigned URL on the S3 server.
        redirect = client.http.get(f"/v1/jobs/{job['id']}/artifacts/report")
        assert redirect.status_code == 307
        assert redirect.headers["location"].startswith(stack["env"]["S3_ENDPOINT_URL"])
        assert "X-Amz-Expires=300" in redirect.headers["location"]
        assert result["artifacts"]["report"]["bytes"] > 0
        assert result["artifacts"]["adapter"]["filename"].endswith("-adapter.tar")
        # The next deletion request: a second job from this one's output.
        check_sequential_job(
            client, job, result["metrics"], fixture_dir, tmp_path / "second", model_cache="hit"
        )
    finally:
        stop_process_group(worker)


def test_a_sharded_full_weight_job_runs_under_the_prefork_worker(stack, fixture_dir, tmp_path):
    """resources.gpus 2 on a CPU worker: the Celery child runs the loop in two gloo ranks
    under torchrun and everything else itself; the job succeeds with its full weights,
    says it was sharded, and says the stop rule did not run."""
    client = stack["client"]
    data = fixture_dir / "data"
    worker = start_worker(stack["env"])
    try:
        job = client.submit_job(
            {
                "method": "catnip",
                "base_model": "tiny",
                "forget_file": upload(client, data / "forget_qa.jsonl", "forget"),
                "adapter": {"type": "full"},
                "resources": {"gpus": 2},
                "hyperparameters": {
                    "learning_rate": 1e-3,
                    "max_steps": 4,
                    "batch_size": 8,
                    "gradient_accumulation_steps": 2,
                    "max_length": 64,
                },
                "eval": {
                    "forget_qa": upload(client, data / "forget_qa.jsonl", "eval"),
                    "retain_qa": upload(client, data / "retain_qa.jsonl", "eval"),
                    "max_samples": 40,
                },
            }
        )
        job = client.wait(job["id"], timeout=300)
        assert job["status"] == "succeeded", job
        metrics = client.metrics(job["id"])
        assert metrics is not None
        assert (metrics["sharded"]["processes"], metrics["sharded"]["backend"]) == (2, "gloo")
        assert metrics["steps"] == {"done": 4, "planned": 4}
        assert metrics["before"] != metrics["after"]  # the ranks' weights came back
        assert "model" in {a["name"] for a in client.artifacts(job["id"])}
        warnings = [e["message"] for e in client.events(job["id"]) if e["type"] == "warning"]
        assert any("stop rule does not run" in w for w in warnings), warnings
    finally:
        stop_process_group(worker)


def test_sigkilled_worker_job_resumes_from_its_checkpoint(stack, fixture_dir):
    client = stack["client"]
    forget = upload(client, fixture_dir / "data" / "forget_qa.jsonl", "forget")
    body = {
        "method": "catnip",
        "base_model": "tiny",
        "forget_file": forget,
        "adapter": {"type": "lora", "r": 8},
        "hyperparameters": {
            "learning_rate": 1e-3,
            "max_steps": 1500,
            "batch_size": 8,
            "max_length": 64,
            "checkpoint_every": 50,
        },
    }
    job = client.submit_job(body)
    worker = start_worker(stack["env"])
    try:
        running = wait_for(
            client, job["id"], lambda j: j["progress"]["step"] >= 120, timeout=180, every=0.05
        )
        assert running["status"] == "running"
        os.killpg(worker.pid, signal.SIGKILL)  # parent and child, no chance to clean up
        worker.wait(10)
        # The next worker runs on "another host": the dead worker's disk is gone, and the
        # checkpoint comes back from S3.
        shutil.rmtree(stack["state"] / "work" / "jobs" / job["id"])
        killed_at = client.get_job(job["id"])
        assert killed_at["status"] == "running" and killed_at["progress"]["step"] < 1500
        # Nothing advances the job now: a short look (absence cannot be waited for) shows it stuck.
        time.sleep(1)
        assert client.get_job(job["id"])["progress"]["step"] == killed_at["progress"]["step"]

        worker = start_worker(stack["env"])  # the reaper re-sends it once the lease expires
        done = client.wait(job["id"], timeout=300)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        resumed = done["progress"]["resumed_from_step"]
        assert resumed is not None and resumed >= 100 and resumed % 50 == 0, done["progress"]
        assert resumed <= killed_at["progress"]["step"]
        events = list(client.events(job["id"]))
        assert any(e["message"] == f"resumed from the checkpoint at step {resumed}" for e in events)
        steps = [e["data"]["step"] for e in events if e["type"] == "step"]
        assert steps[-1] == 1500
        # After the resume, steps continue from the checkpoint, not from zero.
        after_resume = steps[
            [e["message"] for e in events if e["type"] in ("step", "message")].index(
                f"resumed from the checkpoint at step {resumed}"
            ) :
        ]
        assert min(after_resume) > resumed
    finally:
        stop_process_group(worker)


def test_running_job_cancels_and_a_broken_model_fails_with_a_code(stack, fixture_dir, tmp_path):
    client = stack["client"]
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    cli(stack["env"], "models", "add", "broken", str(broken))
    forget = upload(client, fixture_dir / "data" / "forget_qa.jsonl", "forget")
    worker = start_worker(stack["env"])
    try:
        failing = client.submit_job({"method": "ga", "base_model": "broken", "forget_file": forget})
        failed = client.wait(failing["id"], timeout=120)
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "model_unavailable", failed["error"]
        assert failed["error"]["message"].startswith("cannot load the model at model 'broken'")
        assert str(broken) not in failed["error"]["message"]  # the operator's path stays private

        long = client.submit_job(
            {
                "method": "catnip",
                "base_model": "tiny",
                "forget_file": forget,
                "hyperparameters": {"max_steps": 100000, "batch_size": 4, "max_length": 64},
            }
        )
        wait_for(client, long["id"], lambda j: j["progress"]["step"] >= 5, timeout=120)
        assert client.cancel_job(long["id"])["cancel_requested"] is True
        cancelled = client.wait(long["id"], timeout=60)
        assert cancelled["status"] == "cancelled" and cancelled["progress"]["step"] < 100000
    finally:
        stop_process_group(worker)


def test_a_lost_message_is_recovered_from_the_jobs_table(stack, fixture_dir, redis_url):
    import redis

    client = stack["client"]
    forget = upload(client, fixture_dir / "data" / "forget_qa.jsonl", "forget")
    job = client.submit_job(
        {
            "method": "catnip",
            "base_model": "tiny",
            "forget_file": forget,
            "hyperparameters": {"max_steps": 3, "max_length": 64},
        }
    )
    broker = redis.Redis.from_url(redis_url)
    queue = stack["env"]["TASK_QUEUE"]
    assert broker.llen(queue) >= 1
    broker.delete(queue)  # the broker lost the message (say, a restart without persistence)
    worker = start_worker(stack["env"])
    try:
        done = client.wait(job["id"], timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1
    finally:
        stop_process_group(worker)
