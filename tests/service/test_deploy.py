"""What the deployment files promise, checked as far as this machine allows (no Docker
engine runs here): the API runs without torch (the slim image), and the compose file
has the stack DESIGN.md describes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_and_job_validation_work_without_torch(tmp_path):
    # torch, transformers and peft made unimportable, as in docker/api.Dockerfile.
    script = f"""
import sys
for name in ("torch", "transformers", "peft", "accelerate", "lm_eval"):
    sys.modules[name] = None
from fastapi.testclient import TestClient
from api.app import create_app
from core.service.settings import Settings
from core.engine.spec import parse_spec
from core.errors import SpecError
app = create_app(Settings(unlearn_data_dir={str(tmp_path)!r}))
assert TestClient(app).get("/healthz").json() == {{"status": "ok"}}
assert "JobCreate" in app.openapi()["components"]["schemas"]
spec = parse_spec({{"method": "npo", "base_model": "m", "forget_file": "f"}})
assert spec.hyperparameters.beta == 0.05
try:
    parse_spec({{"method": "nope", "base_model": "m", "forget_file": "f"}})
except SpecError as exc:
    assert "valid methods" in exc.message
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_compose_has_the_production_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "minio", "migrate", "api", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["unlearn", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    env = compose["x-env"]
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and env["BROKER_URL"].startswith(
        "redis://"
    )
    assert env["S3_ENDPOINT_URL"] == "http://minio:9000"
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert "COPY migrations migrations" in text and "USER unlearn" in text
    requirements = [
        line.split(">")[0].split("[")[0].strip()
        for line in (ROOT / "docker" / "requirements-api.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "fastapi" in requirements
    assert not {"torch", "transformers", "peft", "lm-eval"} & set(requirements)


@pytest.mark.parametrize("command", [["worker"], ["serve", "--port", "1"]])
def test_a_worker_for_a_device_that_is_not_here_does_not_start(tmp_path, command):
    """WORKER_DEVICE names a GPU this machine lacks: the worker would take every job and
    fail it (device_unavailable); it refuses to start instead, before touching the
    data directory or the broker."""
    import os

    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "S3_BUCKET")
    }
    env.update(UNLEARN_DATA_DIR=str(tmp_path / "state"), WORKER_DEVICE="cuda:99")
    result = subprocess.run(
        [sys.executable, "-m", "api", *command],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert (
        "error [device_unavailable]: device 'cuda:99' was asked for, but this machine has "
        in result.stderr
        and "; the worker did not start" in result.stderr
    ), result.stderr
    assert not (tmp_path / "state").exists()


def test_the_stack_scrapes_the_api_and_the_dashboard_reads_what_it_exposes(tmp_path):
    """Compose runs Prometheus on the API's /metrics; every series the Grafana dashboard
    queries is one /metrics serves (a renamed metric breaks this test, not a panel)."""
    import json
    import re

    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.service.settings import Settings

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "prometheus" in compose["services"]
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == ["api:8000"]
    assert scrape[0]["metrics_path"] == "/metrics"

    from core.service.migrate import upgrade

    settings = Settings(unlearn_data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        client.get("/healthz")
        broken = client.get("/metrics")  # no tables yet: the request metrics still come
        assert broken.status_code == 200 and "unlearn_jobs_readable 0.0" in broken.text
        upgrade(settings.db_url)
        families = [
            line.split()[2:4]
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("# TYPE ")
        ]
    suffixes = {
        "counter": ("",),
        "gauge": ("",),
        "summary": ("", "_sum", "_count"),
        "histogram": ("_bucket", "_sum", "_count"),
    }
    exposed = {
        name if kind == "counter" else name + suffix  # a counter's TYPE line names its _total
        for name, kind in families
        for suffix in suffixes.get(kind, ("",))
    }
    dashboard = json.loads((ROOT / "docker" / "grafana" / "unlearn-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"unlearn_[a-z_]+", target["expr"])
    }
    assert queried and queried <= exposed, queried - exposed
