"""The processes the service starts, seen from outside: `unlearn serve` stopped the way a
supervisor or a container runtime stops it, and the prefork worker's parent process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import ROOT, add_job_row, free_port, stop_process_group, wait_http


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the command in ()
        if parent == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


@contextlib.contextmanager
def _serving(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """`unlearn serve` with its worker (on the default settings), up: (serve, the
    worker's pid)."""
    port = free_port()
    environ = {**os.environ, "UNLEARN_DATA_DIR": str(tmp_path / "state")}
    environ.pop("WORKER_THREADS", None)
    serve = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=environ,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", serve, timeout=90)
        _wait(lambda: _children(serve.pid), 30, "serve started no worker")
        [worker] = _children(serve.pid)
        yield serve, worker
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in _children(serve.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_serve_stopped_stops_its_worker(tmp_path, stop):
    """`kill PID` (SIGTERM) on `unlearn serve` stops its Celery worker too, so none is
    left as an orphan polling the embedded broker (uvicorn re-raises the signal after its
    own shutdown, so serve must stop the worker before that). Killed outright, serve
    cannot stop it; the worker is told by the kernel that its parent died."""
    with _serving(tmp_path) as (serve, worker):
        serve.send_signal(stop)
        serve.wait(60)
        _wait(
            lambda: not _alive(worker),
            30,
            f"the worker {worker} is still running after serve exited",
        )


def test_the_embedded_worker_leaves_the_api_a_core(tmp_path):
    """`unlearn serve`'s worker takes all cores but one unless WORKER_THREADS says
    otherwise: on every core, the training job loses a quarter or more of its speed to
    200 dashboards polling the API beside it (docs/performance.md)."""
    from api.cli.processes import embedded_worker_threads

    with _serving(tmp_path) as (_, worker):
        environ = dict(
            item.split("=", 1)
            for item in (Path("/proc") / str(worker) / "environ").read_text().split("\0")
            if "=" in item
        )
    cores = len(os.sched_getaffinity(0))
    assert environ["WORKER_THREADS"] == str(max(1, cores - 1))
    assert embedded_worker_threads(3) == 3  # set by the operator: kept


def test_the_prefork_parent_never_imports_torch(tmp_path):
    """The reaper runs in the prefork parent, which must not import torch (the job
    runner brings it in through the loss backend): a fork after torch's OpenMP started
    can hang the children. Checked in the parent's memory map once the reaper has re-sent
    an orphaned job."""
    from core.service.db import make_engine, make_sessionmaker, utcnow
    from core.service.migrate import upgrade

    state = tmp_path / "state"
    state.mkdir()
    env = {**os.environ, "UNLEARN_DATA_DIR": str(state), "REAP_EVERY_SECONDS": "0.5"}
    url = f"sqlite:///{state / 'unlearn.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    add_job_row(
        sessions,
        "job-orphan",
        status="running",
        lease_owner="dead-host:1",
        lease_expires_at=utcnow(),
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "api", "worker", "--pool", "prefork"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(
            lambda: b"job-orphan: lease expired; re-sending it" in log.read_bytes(),
            90,
            "the reaper did not re-send the orphaned job",
        )
        maps = (Path("/proc") / str(worker.pid) / "maps").read_text()
        assert "libtorch" not in maps, "the prefork parent loaded torch"
    finally:
        stop_process_group(worker)
