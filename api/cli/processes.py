"""The service's processes: `unlearn serve` (the API, with a worker beside it in the
embedded default) and `unlearn worker` (a Celery worker for the production stack)."""

# The imports of the API server and of core.service are inside `serve`: `unlearn` with
# only the base install (the client) imports this module to list every command; uvicorn,
# fastapi and the rest come with the api extra.

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import typer

from api.cli.service import load_settings, prepare_embedded

if TYPE_CHECKING:
    from core.service.settings import Settings


def worker_command(settings: Settings, *, pool: str | None = None) -> list[str]:
    # Embedded: one solo process (no fork at all). Production: prefork with one child per
    # worker process, the model loaded in the child; one GPU per worker via CUDA_VISIBLE_DEVICES.
    pool = pool or ("solo" if settings.embedded else "prefork")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        "1",
        "-Q",
        settings.queue_for(settings.worker_class),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


_DEVICE_PROBE = """
import sys
from core.errors import UnlearnError
from core.engine.modeling import pick_device
try:
    pick_device(sys.argv[1])
except UnlearnError as exc:
    sys.exit(exc.message)
"""


def _check_worker_device(device: str | None) -> None:
    """Refuse to start a worker told to use a device that is not here (WORKER_DEVICE,
    --gpu): it would take every job from the queue and fail it. Probed in a subprocess:
    the worker's prefork parent, which this process becomes, must not import torch."""
    if not device:
        return  # auto: CUDA if present, else the CPU; always there
    probe = subprocess.run(
        [sys.executable, "-c", _DEVICE_PROBE, device], capture_output=True, text=True
    )
    if probe.returncode != 0:
        reason = (
            probe.stderr.strip().splitlines()[-1]
            if probe.stderr.strip()
            else f"exit {probe.returncode}"
        )
        typer.echo(f"error [device_unavailable]: {reason}; the worker did not start", err=True)
        raise typer.Exit(2)


def worker(
    pool: str | None = typer.Option(
        None, help="solo or prefork (default: prefork; solo embedded)."
    ),
    gpu: str | None = typer.Option(
        None,
        help="Pin this worker to one GPU (CUDA_VISIBLE_DEVICES); "
        "run one worker per GPU. Default: cuda if present, else cpu.",
    ),
    worker_class: str | None = typer.Option(
        None,
        "--class",
        help="The worker class this worker serves (one of WORKER_CLASSES): it takes the "
        "jobs routed to that class's queue.",
    ),
) -> None:
    """A Celery worker: takes job ids from the broker and runs them through core."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        os.environ["WORKER_DEVICE"] = "cuda"
    if worker_class is not None:
        os.environ["WORKER_CLASS"] = worker_class
    settings = load_settings()
    classes = settings.worker_classes or {}
    if (settings.worker_class is not None) != bool(classes) or (
        classes and settings.worker_class not in classes
    ):
        typer.echo(
            f"error [worker_class]: --class {settings.worker_class!r} with WORKER_CLASSES "
            f"{sorted(classes) or 'unset'}: with classes, name one of them; without, none",
            err=True,
        )
        raise typer.Exit(2)
    _check_worker_device(settings.worker_device)
    if settings.embedded:
        prepare_embedded(settings)
    command = worker_command(settings, pool=pool)
    os.execv(command[0], command)


def serve(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    with_worker: bool = typer.Option(True, help="Also start a worker (the embedded default)."),
    workers: int = typer.Option(1, min=1, help="API processes (the production stack)."),
) -> None:
    """The API plus a worker. Embedded (SQLite, local store, a server-less queue) when
    DATABASE_URL / BROKER_URL are not set; state under UNLEARN_DATA_DIR."""
    from api import server
    from core.service import logs

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    if with_worker and settings.worker_classes:
        typer.echo(
            "error [worker_class]: with WORKER_CLASSES, jobs go to each class's queue: start "
            "the API with --no-with-worker and one `unlearn worker --class NAME` per class",
            err=True,
        )
        raise typer.Exit(2)
    if with_worker:
        _check_worker_device(settings.worker_device)
    prepare_embedded(settings)
    worker_process = None
    if with_worker:
        env = {
            **os.environ,
            "UNLEARN_DATA_DIR": str(settings.unlearn_data_dir),
            "WORKER_THREADS": str(embedded_worker_threads(settings.worker_threads)),
        }
        worker_process = subprocess.Popen(
            worker_command(settings), env=env, preexec_fn=_die_with_parent
        )
    # uvicorn shuts down on SIGTERM, then raises the signal again; with the default
    # handler that ends this process before `finally` could stop the worker.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    mode = "embedded (SQLite, local store)" if settings.embedded else "configured services"
    typer.echo(
        f"serving on http://{host}:{port} ({mode}); data in {settings.unlearn_data_dir}", err=True
    )
    try:
        server.run(settings, host=host, port=port, workers=workers)
    finally:
        if worker_process is not None:
            worker_process.send_signal(signal.SIGTERM)
            try:
                worker_process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker_process.kill()


def embedded_worker_threads(configured: int) -> int:
    """Torch threads of the worker `unlearn serve` starts beside the API: WORKER_THREADS
    where set, else every core this process may use but one, left to the API. A training
    job on every core loses far more than a core's share whenever the API answers: each
    parallel region waits for the thread the API's work descheduled (docs/performance.md,
    "Dashboards polling a job that trains")."""
    if configured:
        return configured
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _die_with_parent() -> None:
    """In a child of `unlearn serve` (Linux): SIGTERM when serve dies, even by SIGKILL, so
    no worker is left polling the broker on its own."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
