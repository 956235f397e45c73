"""`unlearn demo`: the main job end to end, over REST, as a tenant runs it: the embedded
service comes up, the demo's files are uploaded, a CATNIP job is submitted and followed,
its artifacts are downloaded and its metrics printed."""

# The imports of core.demo and core.service are inside the functions: `unlearn` with only
# the base install (the client) imports this module to list every command; the demo
# needs the worker extra (torch) to run.

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import typer

from api.cli.service import load_settings, prepare_embedded, sessions
from api.cli.tenant import follow as follow_job
from api.client import APIError, ChecksumError, Client
from core import cli as core_cli

if TYPE_CHECKING:
    from core.service.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(
    client: httpx.Client, process: subprocess.Popen[bytes], timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not become ready in time")


def run_demo_over_rest(
    client: Client,
    demo_dir: Path,
    out_dir: Path,
    *,
    steps: int,
    model_name: str = "demo-llama",
) -> dict[str, Any]:
    """With the Python client, as a tenant would: upload the demo's files, submit the
    CATNIP job, follow it live with a progress bar, download and check the artifacts.
    Returns the job, its metrics and what was saved."""
    from core.demo.build import demo_spec

    local = demo_spec(demo_dir, max_steps=steps)
    request = client.upload_spec_files({**local, "base_model": model_name})
    if "reference_model" in request.get("eval", {}):  # registered by the demo beside its model
        request["eval"]["reference_model"] = f"{model_name}-reference"
    typer.echo(f"[demo] uploaded the demo's files; submitting a {request['method']} job", err=True)
    job = client.submit_job(request)
    job = follow_job(client, job["id"], None)
    if job["status"] != "succeeded":
        error = job["error"] or {"code": None, "message": None}
        raise RuntimeError(f"job {job['id']} {job['status']}: {error['code']}: {error['message']}")
    saved = {
        a["name"]: client.download_artifact(job["id"], a["name"], out_dir)
        for a in client.artifacts(job["id"])
    }
    return {"job": job, "metrics": client.metrics(job["id"]), "artifacts": saved}


def demo(
    steps: int = typer.Option(
        60, help="Unlearning steps (upper bound; the stop rule may end sooner)."
    ),
    port: int = typer.Option(0, help="Port for the embedded service (0: any free port)."),
) -> None:
    """The main job end to end: the embedded service comes up, the demo forget set is
    uploaded, a CATNIP job is submitted over REST and polled, the result is downloaded."""
    core_cli._quiet_libraries()
    started = time.monotonic()
    settings = load_settings()
    if not settings.embedded:
        typer.echo(
            "[demo] DATABASE_URL/BROKER_URL are set: the demo runs on the embedded default "
            "only; unset them",
            err=True,
        )
        raise typer.Exit(2)
    demo_dir = settings.unlearn_data_dir / "demo"
    typer.echo(
        f"[demo model] {demo_dir} (built once: about 2 minutes on 2 idle CPU cores, longer on busy ones; the bar shows its ETA)",
        err=True,
    )
    from core.demo.build import ensure_model  # torch loads here, once the line above is out

    events = core_cli.ConsoleEvents()
    info = ensure_model(demo_dir, events=events, reference=True)
    events.close()
    typer.echo(
        f"[demo model] {info['parameters']:,} parameters, {info['facts']} facts, "
        f"answers {info['accuracy']}",
        err=True,
    )
    prepare_embedded(settings)
    key = _register_demo(settings, demo_dir)
    result = _run_on_embedded_service(settings, key, port or _free_port(), demo_dir, steps)
    _print_result(result, settings.unlearn_data_dir / "demo-output", started)
    _print_access(key, result["job"]["id"], settings.unlearn_data_dir)


def _register_demo(settings: Settings, demo_dir: Path) -> str:
    """The demo model and its reference registered, and a key for the tenant "demo"."""
    from core.service import repo
    from core.service.signing import directory_digest

    with sessions(settings).begin() as session:
        repo.add_model(
            session,
            "demo-llama",
            str(demo_dir / "model"),
            "The built-in demo model",
            digest=directory_digest(demo_dir / "model"),
        )
        repo.add_model(
            session,
            "demo-llama-reference",
            str(demo_dir / "reference"),
            "The demo model's recipe without the dragons: never saw the forget set",
            digest=directory_digest(demo_dir / "reference"),
            reference_for="demo-llama",
        )
        _, key = repo.create_key(session, "demo", "unlearn demo")
    return key


def _run_on_embedded_service(
    settings: Settings, key: str, port: int, demo_dir: Path, steps: int
) -> dict[str, Any]:
    """`unlearn serve` in a subprocess (its log in the data directory), the demo run
    against it over REST, the service stopped."""
    env = {**os.environ, "UNLEARN_DATA_DIR": str(settings.unlearn_data_dir)}
    log_path = settings.unlearn_data_dir / "serve.log"
    log_file = log_path.open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        with Client(f"http://127.0.0.1:{port}", key, retries=2) as client:
            _wait_ready(client.http, server)
            typer.echo(
                f"[demo] service up on http://127.0.0.1:{port} (embedded; its log: {log_path})",
                err=True,
            )
            return run_demo_over_rest(
                client, demo_dir, settings.unlearn_data_dir / "demo-output", steps=steps
            )
    except (APIError, ChecksumError, ValueError, RuntimeError) as exc:
        typer.echo(f"[demo] error: {exc} (the service log: {log_path})", err=True)
        raise typer.Exit(1) from None
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()


def _print_result(result: dict[str, Any], out_dir: Path, started: float) -> None:
    """The before/after table, the stop rule, the artifacts; the metrics saved as JSON."""
    core_cli._print_table(result["metrics"])
    stop = result["metrics"].get("stop_rule") or {}
    if stop:
        typer.echo(
            f"stop rule: {stop.get('reason') or 'ran all steps'}; kept the state of step "
            f"{stop.get('best', {}).get('step')}"
        )
    for name, path in result["artifacts"].items():
        typer.echo(f"{name}: {path}")
    typer.echo(
        f"job {result['job']['id']} succeeded; end to end {time.monotonic() - started:.0f} s"
    )
    (out_dir / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))


def _print_access(key: str, job_id: str, data_dir: Path) -> None:
    """How to see the demo's job again: its tenant, the key (shown once, stored hashed)
    and the commands that serve the same data with the dashboard."""
    typer.echo(
        f"\nThe demo's tenant is demo; its API key (shown once): {key}\n"
        f"To open job {job_id} in the dashboard or over curl, serve the same data:\n"
        f"  UNLEARN_DATA_DIR={data_dir} unlearn serve --port 8000\n"
        f"  then http://127.0.0.1:8000/dashboard#/jobs/{job_id} (sign in with the key), or\n"
        f"  export UNLEARN_API_URL=http://127.0.0.1:8000 UNLEARN_API_KEY={key}"
    )
