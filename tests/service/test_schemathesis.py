"""Schemathesis against the running API (`unlearn serve`, as deployed), stateless and
stateful, on the embedded default and on Postgres + Redis: no server error and no
response that breaks the OpenAPI document, within a bounded time per backend.

`positive_data_acceptance` is left out: a schema-valid request may still name a model
that is not registered or a file that does not exist, which only the service can know,
and it answers those with a 4xx by design."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.service.conftest import ROOT, cli, free_port, wait_http

SECONDS = int(os.environ.get("SCHEMATHESIS_SECONDS", "50"))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_no_server_errors_and_no_schema_violations(backend, tmp_path, fixture_dir, request):
    env = {
        **os.environ,
        "UNLEARN_DATA_DIR": str(tmp_path / "state"),
        "RATE_LIMIT": "1000/second",
        "ANONYMOUS_RATE_LIMIT": "1000/second",
        "MAX_ACTIVE_JOBS": "100000",
        "TASK_QUEUE": f"schemathesis-{backend}",
    }
    if backend == "postgres":
        env |= {
            "DATABASE_URL": request.getfixturevalue("migrated_pg"),
            "BROKER_URL": request.getfixturevalue("redis_url"),
        }
    cli(env, "migrate")
    cli(env, "models", "add", "tiny", str(fixture_dir / "model"))
    key = cli(env, "keys", "create", "--tenant", f"fuzz-{backend}").strip().splitlines()[-1]
    port = free_port()
    # The server's log to a file: a pipe nobody reads fills up and blocks the server.
    server = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--no-with-worker", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.log").open("wb"),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", server)
        run = subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "st"),
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "-H",
                f"Authorization: Bearer {key}",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-time",
                str(SECONDS),
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=SECONDS + 120,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "Server error" not in run.stdout
    finally:
        server.terminate()
        server.wait(30)
