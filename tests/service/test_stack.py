"""The compose stack, built and run here (scripts/stack.sh): the images from the local
Debian base and the wheelhouse, then migration, API behind nginx, a CPU worker,
Postgres, Redis, an S3 server and Prometheus in containers. As a tenant: a key, uploads,
a job through the Python client, the adapter downloaded and its certificate verified;
the worker container restarted mid-job and the job resumed; `down` leaves nothing.

A failing step names itself and carries the containers' last log lines. Needs a Docker
engine (scripts/stack.sh installs and starts Debian's where it can): where none can run,
this fails, it does not skip. Run with: pytest -m stack tests/service/test_stack.py"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ROOT, free_port
from tests.service.flow import lora_job, upload, wait_for

pytestmark = pytest.mark.stack
STACK = ["bash", str(ROOT / "scripts" / "stack.sh")]


class StepFailed(AssertionError):
    pass


class Stack:
    """The stack's compose project; `step` names what failed and shows the logs."""

    def __init__(self, env: dict[str, str], services: tuple[str, ...]) -> None:
        self.env, self.services = env, services

    def run(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run(
            [*STACK, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result.stdout

    def compose(self, *args: str, timeout: float = 300) -> str:
        return self.run("compose", *args, timeout=timeout)

    def logs(self, lines: int = 25) -> str:
        result = subprocess.run(
            [*STACK, "compose", "logs", "--no-color", "--tail", str(lines), *self.services],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result.stdout + result.stderr

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            raise StepFailed(
                f"stack step '{name}' failed: {exc}\n--- last log lines ---\n{self.logs()}"
            ) from exc


SERVICES = ("postgres", "redis", "minio", "migrate", "api", "proxy", "cpu-worker", "prometheus")


@pytest.fixture(scope="module")
def stack(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(fixture_dir / "model", models / "tiny")
    subprocess.run(["chmod", "-R", "a+rX", str(models)], check=True)
    ports = {name: str(free_port()) for name in ("http", "s3", "prometheus")}
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"unlearnstack{os.getpid()}",
        "UNLEARN_MODELS_DIR": str(models),
        "UNLEARN_HTTP_PORT": ports["http"],
        "UNLEARN_S3_PORT": ports["s3"],
        "UNLEARN_PROMETHEUS_PORT": ports["prometheus"],
    }
    stack = Stack(env, SERVICES)
    started = time.monotonic()
    with stack.step("prepare (engine, base image, wheelhouse, images)"):
        stack.run("prepare", timeout=3600)
    prepared = time.monotonic()
    try:
        with stack.step("up"):
            stack.run("up", timeout=600)
            url = f"http://127.0.0.1:{ports['http']}"
            wait_ready(url + "/readyz", timeout=240)
        yield {"stack": stack, "url": url, "ports": ports}
    finally:
        with stack.step("down"):
            stack.run("down", timeout=300)
            left = subprocess.run(
                [
                    "docker",
                    "ps",
                    "-aq",
                    "--filter",
                    f"label=com.docker.compose.project={env['COMPOSE_PROJECT_NAME']}",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            assert left == [], f"containers left behind: {left}"
        print(
            f"stack timings: prepare {prepared - started:.0f}s, "
            f"up to down {time.monotonic() - prepared:.0f}s",
            file=sys.stderr,
        )


def wait_ready(url: str, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    raise AssertionError(f"{url} not ready in {timeout}s: {last}")


def test_the_images_run_as_non_root_and_only_the_worker_has_torch(stack):
    s = stack["stack"]
    with s.step("images"):
        assert s.compose("exec", "-T", "api", "id", "-u").strip() == "10001"
        assert s.compose("exec", "-T", "cpu-worker", "id", "-u").strip() == "10001"
        no_torch = subprocess.run(
            [*STACK, "compose", "exec", "-T", "api", "python3", "-c", "import torch"],
            env=s.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            no_torch.returncode != 0
            and "No module named 'torch'" in no_torch.stderr + no_torch.stdout
        )
        engine = "import torch, core.engine.pipeline, worker.tasks; print(torch.__version__)"
        version = s.compose("exec", "-T", "cpu-worker", "python3", "-c", engine).strip()
        assert version.endswith("+cpu"), version
        for image in ("unlearn-api:local", "unlearn-worker:local"):
            labels = json.loads(
                subprocess.run(
                    ["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", image],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            assert labels["org.opencontainers.image.version"] == "0.1.0", labels
            assert len(labels["org.opencontainers.image.revision"]) == 40, labels


def test_a_tenant_job_through_the_stack_and_a_restarted_worker(stack, fixture_dir, tmp_path):
    from api.client import Client

    s = stack["stack"]
    with s.step("operator: model and key"):
        s.compose("exec", "-T", "cpu-worker", "unlearn", "models", "add", "tiny", "/models/tiny")
        out = s.compose("exec", "-T", "api", "unlearn", "keys", "create", "--tenant", "stack")
        key = out.strip().splitlines()[-1]
    client = Client(stack["url"], key)
    data = fixture_dir / "data"
    with s.step("bad input is a 4xx"):
        refused = client.http.post("/v1/jobs", json={"method": "nope", "base_model": "tiny"})
        assert refused.status_code == 422, refused.text
    with s.step("job: upload, submit, follow"):
        job = lora_job(client, data)
        events: list[dict] = []
        job = client.wait(job["id"], timeout=600, on_event=events.append)
        assert job["status"] == "succeeded", job
        assert any(e["type"] == "step" for e in events), events[-5:]
    with s.step("download and verify"):
        verify(client, job["id"], tmp_path)
    with s.step("worker restarted mid-job"):
        resume_after_restart(s, client, data)
    with s.step("prometheus scrapes /metrics"):
        prometheus = f"http://127.0.0.1:{stack['ports']['prometheus']}"
        deadline = time.monotonic() + 60
        while True:
            targets = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()
            health = [t["health"] for t in targets["data"]["activeTargets"]]
            if health == ["up"] or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert health == ["up"], targets
        query = httpx.get(
            prometheus + "/api/v1/query", params={"query": "unlearn_jobs"}, timeout=10
        ).json()
        assert query["status"] == "success" and query["data"]["result"], query


def unlearn_verify(out: Path, artifact: Path) -> subprocess.CompletedProcess[str]:
    """`unlearn verify` of the downloaded certificate against the published keys."""
    command = [sys.executable, "-m", "api", "verify", str(out / "certificate.json")]
    command += ["--keys", str(out / "keys.json"), "--artifact", str(artifact)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def verify(client, job_id: str, out: Path) -> None:
    certificate = client.certificate(job_id)
    (out / "certificate.json").write_bytes(certificate)
    (out / "keys.json").write_text(httpx.get(client.base_url + "/v1/signing-keys").text)
    adapter = client.download_artifact(job_id, "adapter", out, unpack=False)
    ok = unlearn_verify(out, adapter)
    assert ok.returncode == 0 and f"valid: job {job_id}" in ok.stdout, ok.stdout + ok.stderr
    # The check can fail: another file is not the certified artifact.
    other = out / "other.tar"
    other.write_bytes(b"not the adapter")
    bad = unlearn_verify(out, other)
    assert bad.returncode != 0, bad.stdout


def resume_after_restart(s: Stack, client, data: Path) -> None:
    job = client.submit_job(
        {
            "method": "catnip",
            "base_model": "tiny",
            "forget_file": upload(client, data / "forget_qa.jsonl", "forget"),
            "adapter": {"type": "lora", "r": 8},
            "hyperparameters": {
                "learning_rate": 1e-3,
                "max_steps": 600,
                "batch_size": 8,
                "max_length": 64,
                "checkpoint_every": 50,
            },
        }
    )
    running = wait_for(client, job["id"], lambda j: j["progress"]["step"] >= 110, timeout=300)
    assert running["status"] == "running", running
    s.compose("restart", "-t", "0", "cpu-worker", timeout=120)
    done = client.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2, done
    resumed = done["progress"]["resumed_from_step"]
    assert resumed is not None and resumed >= 100 and resumed % 50 == 0, done["progress"]


def test_a_failed_step_names_itself_and_shows_the_logs(tmp_path):
    """The reporting itself, on a compose project that does not exist (no engine needed
    for the failure to be reported; the logs are whatever compose answers)."""
    stack = Stack({**os.environ, "COMPOSE_PROJECT_NAME": "unlearnstack-none"}, ("api",))
    with pytest.raises(StepFailed) as failed:
        with stack.step("job"):
            raise AssertionError("job job-1 failed: model_unavailable")
    message = str(failed.value)
    assert message.startswith("stack step 'job' failed: job job-1 failed: model_unavailable")
    assert "--- last log lines ---" in message
    unknown = subprocess.run([*STACK, "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "stack.sh images" in unknown.stderr
