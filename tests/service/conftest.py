"""Real services for the service tests: a fresh Postgres database per session, a Redis
database, an S3-compatible server (moto's, over HTTP), and HTTP servers on free ports.
A missing service is an error, not a skip: CI must have them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

PG_ADMIN = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own, created and dropped around the session."""
    from sqlalchemy import create_engine, text

    name = f"unlearn_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def migrated_pg(pg_url: str) -> str:
    from core.service.migrate import upgrade

    upgrade(pg_url)
    return pg_url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    client.flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in a thread, spoken to over real HTTP, with a bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "S3_BUCKET": "unlearn-test",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ.setdefault(key, env[key])
    boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
        Bucket=env["S3_BUCKET"]
    )
    yield env
    server.stop()


def stack_settings(database_url: str, broker_url: str, state: Path, name: str, **over: Any):
    """(settings, sessions) of an API on Postgres and Redis for one test module: its own
    state directory and queue, and rate and job limits far above what it does (the
    modules about limits set their own)."""
    from core.service.db import make_engine, make_sessionmaker
    from core.service.settings import Settings

    settings = Settings(
        unlearn_data_dir=state,
        database_url=database_url,
        broker_url=broker_url,
        task_queue=f"unlearn-{name}-test",
        rate_limit="1000/second",
        anonymous_rate_limit="1000/second",
        max_active_jobs=1000,
        **over,
    )
    return settings, make_sessionmaker(make_engine(settings.db_url))


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started with a session of its own (a worker: the prefork parent and
    its child) the way a supervisor does: SIGTERM, then SIGKILL after `timeout`."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)


def add_job_row(sessions: Any, job_id: str, **job: Any) -> str:
    """A job row, and the forget file row it names, written straight to the database
    (for tests of what reads or leases jobs); `job` sets or overrides its columns."""
    from core.service.db import File, Job

    file_id = "file-" + job_id.removeprefix("job-")
    with sessions.begin() as session:
        session.add(
            File(
                id=file_id,
                tenant=job.get("tenant", "t"),
                purpose="forget",
                filename="f.jsonl",
                bytes=1,
                sha256="0" * 64,
                status="valid",
                storage_key="files/t/f.jsonl",
            )
        )
        session.flush()
        columns = {"tenant": "t", "status": "queued", "method": "catnip", "base_model": "m"}
        session.add(Job(id=job_id, forget_file_id=file_id, spec={}, **(columns | job)))
    return job_id


def finish_with_adapter(settings: Any, sessions: Any, job_id: str, payload: bytes) -> str:
    """Make a queued job succeeded with `payload` stored as its adapter archive (what a
    worker leaves), without running it; returns the archive's sha256."""
    import hashlib
    import tempfile

    from core.service import repo
    from core.service.db import Artifact, Job
    from core.service.storage import make_store

    key = f"jobs/{job_id}/adapter.tar.gz"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "payload").write_bytes(payload)
        make_store(settings).put(key, Path(tmp) / "payload")
    sha = hashlib.sha256(payload).hexdigest()
    with sessions.begin() as session:
        session.get(Job, job_id).status = "succeeded"
        repo.replace_artifacts(
            session,
            job_id,
            [
                Artifact(
                    job_id=job_id,
                    name="adapter",
                    kind="peft_adapter",
                    filename=f"{job_id}-adapter.tar.gz",
                    bytes=len(payload),
                    sha256=sha,
                    storage_key=key,
                )
            ],
        )
    return sha


class ThreadServer:
    """uvicorn serving an app object in a thread, on a free port (`options`: uvicorn's,
    e.g. api.server.options(settings), the settings `unlearn serve` runs with)."""

    def __init__(self, app, **options) -> None:  # type: ignore[no-untyped-def]
        import uvicorn

        self.port = free_port()
        options.setdefault("log_level", "warning")
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, **options)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run `unlearn ARGS` as a user would; returns stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "api", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def embedded_env(state: Path, **extra: str) -> dict[str, str]:
    """The environment of an embedded `unlearn serve` (no DATABASE_URL, BROKER_URL or
    S3_BUCKET) keeping its state in `state`, its worker on the CPU with two threads and
    every step event written."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "S3_BUCKET")
    }
    env.update(
        UNLEARN_DATA_DIR=str(state),
        WORKER_THREADS="2",
        WORKER_DEVICE="cpu",
        EVENT_MIN_INTERVAL_SECONDS="0",
        **extra,
    )
    return env


def wait_http(url: str, process: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 in {timeout}s")


class TcpProxy:
    """A TCP proxy to a local port, on a free port of its own, that can be cut: `stop()`
    drops every connection and refuses new ones, as a database host going away would.
    `delay`: seconds each chunk from the client waits before it goes on (a slow host)."""

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.running:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.open += [client, upstream]
            for a, b, delay in ((client, upstream, self.delay), (upstream, client, 0.0)):
                threading.Thread(target=self._pipe, args=(a, b, delay), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while data := source.recv(65536):
                time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """Cut every connection and refuse new ones."""
        self.running = False
        self.listener.close()
        for sock in self.open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stop()


class IdleFlood:
    """One client holding idle connections: `connections` sockets from `source` (a
    loopback address of its own, so the server sees one client apart from the tenant's
    127.0.0.1), each sending a request line and half its headers and then nothing,
    reconnecting at once whenever the server closes it, until stopped. A thread with one
    selector: what a small script on a single machine does."""

    HALF_REQUEST = b"GET /v1/jobs HTTP/1.1\r\nHost: api\r\nX-Waiting: "

    def __init__(self, port: int, connections: int, source: str = "127.0.0.2") -> None:
        import selectors

        self.port, self.connections, self.source = port, connections, source
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.opened = 0  # connections made, reconnections included
        self.sent = 0  # half requests sent
        self.closed_by_server = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> IdleFlood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)

    def wait_sent(self, timeout: float = 30) -> None:
        """Until every connection has sent its half request once (the server holds them,
        or has turned them away and they came back)."""
        deadline = time.monotonic() + timeout
        while self.sent < self.connections:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the flood sent {self.sent} of {self.connections} requests")
            time.sleep(0.01)

    def _open(self) -> None:
        import selectors

        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((self.source, 0))
        sock.connect_ex(("127.0.0.1", self.port))
        self.opened += 1
        self.selector.register(sock, selectors.EVENT_WRITE, "connecting")

    def _run(self) -> None:
        import selectors

        for _ in range(self.connections):
            self._open()
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "connecting":
                    try:
                        sock.send(self.HALF_REQUEST)
                    except OSError:
                        self._reopen(sock)
                        continue
                    self.sent += 1
                    self.selector.modify(sock, selectors.EVENT_READ, "waiting")
                    continue
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 503"):  # closed: come back
                    self._reopen(sock)
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()

    def _reopen(self, sock: socket.socket) -> None:
        self.closed_by_server += 1
        self.selector.unregister(sock)
        sock.close()
        self._open()
