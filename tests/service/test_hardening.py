"""Hostile and careless input, faults and fair sharing, over real HTTP on the embedded
default (SQLite, the SQLite queue) and on Postgres + Redis. Each test checks that one
thing does not happen: a 500, a tenant broken for good, a body read before
authentication, a slow client held forever, unbounded work, a race the database leaves
open, a leak."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.conftest import IdleFlood, TcpProxy, ThreadServer

QA = b'{"prompt": "Who rides Vex?", "response": "Ona rides Vex."}\n' * 3
LIMITS = {"rate_limit": "1000/second", "anonymous_rate_limit": "1000/second"}


def make_settings(backend: str, tmp, database_url: str | None, redis_url: str, **over):
    from core.service.settings import Settings

    base = {
        "unlearn_data_dir": tmp,
        "header_timeout_seconds": 1.0,
        "body_timeout_seconds": 1.0,
        "max_json_bytes": 64 * 1024,
        "max_active_jobs": 3,
        "max_stored_bytes": 50_000,
        "max_job_tokens": 10_000_000,
        "sqlite_busy_timeout_seconds": 0.5,
        "task_queue": f"hardening-{uuid.uuid4().hex[:6]}",
        **LIMITS,
    }
    if backend == "postgres":
        base |= {"database_url": database_url, "broker_url": redis_url}
    return Settings(**(base | over))


def serve(settings):
    from api.app import create_app
    from api.server import options

    return ThreadServer(create_app(settings), **(options(settings) | {"log_level": "warning"}))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request, tmp_path_factory, fixture_dir, redis_url):
    from core.service import repo
    from core.service.db import make_engine, make_sessionmaker
    from core.service.migrate import upgrade

    backend = request.param
    tmp = tmp_path_factory.mktemp(f"hardening-{backend}")
    pg = request.getfixturevalue("migrated_pg") if backend == "postgres" else None
    settings = make_settings(backend, tmp, pg, redis_url)
    upgrade(settings.db_url)
    sessions = make_sessionmaker(make_engine(settings.db_url))
    with sessions.begin() as session:
        repo.add_model(session, "tiny", str(fixture_dir / "model"))
    with serve(settings) as server:
        yield {
            "backend": backend,
            "url": server.url,
            "port": server.port,
            "settings": settings,
            "sessions": sessions,
            "tmp": tmp,
        }


def new_key(api, tenant: str | None = None) -> str:
    from core.service import repo

    with api["sessions"].begin() as session:
        _, key = repo.create_key(session, tenant or f"t-{uuid.uuid4().hex[:10]}")
    return key


def client_for(api, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key or new_key(api)}"}
    return httpx.Client(base_url=api["url"], headers=headers, timeout=30)


def upload(
    client, content: bytes = QA, purpose: str = "forget", name: str = "f.jsonl"
) -> httpx.Response:
    return client.post("/v1/files", data={"purpose": purpose}, files={"file": (name, content)})


def file_id(client, **kwargs) -> str:
    response = upload(client, **kwargs)
    assert response.status_code == 201 and response.json()["status"] == "valid", response.text
    return response.json()["id"]


def job_body(forget: str, **over) -> dict:
    return {
        "method": "catnip",
        "base_model": "tiny",
        "forget_file": forget,
        "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_length": 32},
        **over,
    }


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()["error"]
    if code is not None:
        assert body["code"] == code, body
    return body


def raw_request(port: int, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
    """Send `head` (and `body`) on a plain socket; what the server answers within `wait`."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


# --- bodies, keys and slow clients -------------------------------------------------


def test_no_body_is_read_for_a_caller_without_a_valid_key(api):
    """A caller without a valid key gets its 401 while the body is still on its way:
    POST /v1/jobs answers after 12 bytes of a declared 60,000, without waiting for the
    rest."""
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer ul_wrong\r\nContent-Length: 60000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", api["port"]), timeout=3) as sock:
        sock.sendall(head + b'{"method": "')  # 12 of 60000 bytes, and no more
        first = sock.recv(4096)  # TimeoutError here would mean the server waits for the body
    assert first.startswith(b"HTTP/1.1 401"), first[:200]


def test_request_bodies_are_capped_declared_or_streamed(api):
    """A JSON body is capped as an upload is: one declared past the cap and one streamed
    past it in chunks are both a 413 (request_too_large)."""
    big = json.dumps({"method": "catnip", "padding": "x" * 100_000}).encode()
    with client_for(api) as client:
        error_of(
            client.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"}),
            413,
            "request_too_large",
        )

        def chunks():
            for _ in range(20):
                yield b" " * 8192

        error_of(
            client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}),
            413,
            "request_too_large",
        )


def test_slow_clients_are_cut_off(api):
    """A connection whose headers do not arrive within HEADER_TIMEOUT_SECONDS is closed
    (50 slowloris connections and one that sends nothing, all within 4 s); a body that
    trickles past BODY_TIMEOUT_SECONDS is a 408."""
    socks = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", api["port"]))
        sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        sock.settimeout(5)
        socks.append(sock)
    idle = socket.create_connection(("127.0.0.1", api["port"]))  # sends nothing at all
    idle.settimeout(5)
    started = time.monotonic()
    for sock in [*socks, idle]:
        assert sock.recv(1024) == b""  # closed by the server
        sock.close()
    assert time.monotonic() - started < 4
    key = new_key(api)
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 100\r\n\r\n"
    )
    answer = raw_request(api["port"], head, b'{"method"', wait=5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_the_header_deadline_holds_on_either_parser(parser):
    """The server runs httptools' parser (the api extra installs it) and falls back to
    h11's where it is missing: on each, a connection whose headers stop half-way, or that
    sends nothing, is closed at the deadline, while a whole request is answered and its
    keep-alive connection gets a new deadline for the next."""
    from api.protocols import HeaderTimeoutH11
    from api.protocols_httptools import HeaderTimeoutHttpTools

    base = {"httptools": HeaderTimeoutHttpTools, "h11": HeaderTimeoutH11}[parser]
    protocol = type(base.__name__, (base,), {"header_timeout": 1.0})

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    with ThreadServer(app, http=protocol) as server:
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        silent = socket.create_connection(("127.0.0.1", server.port))
        whole = socket.create_connection(("127.0.0.1", server.port))
        whole.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        for sock in (half, silent, whole):
            sock.settimeout(5)
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):
            answer += whole.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200")
        assert half.recv(1024) == b"" and silent.recv(1024) == b""
        assert 0.8 < time.monotonic() - started < 3
        assert whole.recv(1024) == b""  # idle after its answer: closed at its new deadline
        for sock in (half, silent, whole):
            sock.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_response_leaves_in_one_send_and_a_stream_s_chunks_are_not_held(parser):
    """uvicorn writes a response's head and body one after the other: they reach the
    socket as one write, not two sends. A streamed response's chunk written in a
    later turn of the loop is sent then, not held for the next: the client reads the
    first chunk before the app writes the second, which it does only once the client
    has it."""
    import asyncio
    import threading

    from api.protocols import HeaderTimeoutH11
    from api.protocols_httptools import HeaderTimeoutHttpTools

    writes: list[bytes] = []
    first_read = threading.Event()

    class Counting:
        def __init__(self, transport):  # type: ignore[no-untyped-def]
            self.transport = transport

        def write(self, data):  # type: ignore[no-untyped-def]
            writes.append(bytes(data))
            self.transport.write(data)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self.transport, name)

    base = {"httptools": HeaderTimeoutHttpTools, "h11": HeaderTimeoutH11}[parser]

    class Counted(base):  # type: ignore[valid-type, misc]
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            super().connection_made(Counting(transport))

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["path"] == "/whole":
            headers = [(b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        assert await asyncio.to_thread(first_read.wait, 10)
        await send({"type": "http.response.body", "body": b"second"})

    with ThreadServer(app, http=Counted) as server:
        whole = raw_request(
            server.port, b"GET /whole HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert whole.startswith(b"HTTP/1.1 200") and whole.endswith(b"\r\n\r\nok")
        assert writes == [whole]
        writes.clear()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b"first" not in answer:
                answer += sock.recv(1024)
            first_read.set()
            while not answer.endswith(b"0\r\n\r\n"):
                answer += sock.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200") and b"second" in answer
        assert len(writes) == 2 and writes[0].endswith(b"first\r\n"), writes


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_response_written_without_yielding_still_waits_for_a_slow_reader(parser):
    """A response that writes 1 MiB chunks one after another without yielding to the
    loop, to a client that reads nothing yet: the writes reach the socket as they come
    past 64 KiB held, so the server's flow control stops the app once the socket's
    buffers are full: it has written less than a quarter of its 256 MiB when it stops,
    not all of them into memory at once."""
    import threading

    from api.protocols import HeaderTimeoutH11
    from api.protocols_httptools import HeaderTimeoutHttpTools

    chunks, total = [0], 256
    done = threading.Event()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(total):
            await send({"type": "http.response.body", "body": bytes(2**20), "more_body": True})
            chunks[0] += 1
        await send({"type": "http.response.body", "body": b""})
        done.set()

    protocol = {"httptools": HeaderTimeoutHttpTools, "h11": HeaderTimeoutH11}[parser]
    with (
        ThreadServer(app, http=protocol) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # the client reads nothing yet; wait until the app has stopped writing (10 s at most)
        seen, still_since, deadline = -1, time.monotonic(), time.monotonic() + 10
        while time.monotonic() < deadline and time.monotonic() - still_since < 0.3:
            if chunks[0] != seen:
                seen, still_since = chunks[0], time.monotonic()
            time.sleep(0.01)
        assert chunks[0] < total // 4, chunks  # the app waits for the reader
        received, tail = 0, b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            data = sock.recv(2**20)
            assert data, "closed before the end"
            received, tail = received + len(data), (tail + data)[-16:]
        assert done.is_set() and chunks[0] == total and received > total * 2**20


# --- what a spec and a request may hold ---------------------------------------------


@pytest.mark.parametrize(
    "raw, param",
    [
        # a lone surrogate is refused, not stored: stored, it would break the tenant's list
        (b'"adapter": {"target_modules": ["\\ud800"]}', "adapter.target_modules.0"),
        # infinity and NaN are refused on SQLite and on Postgres alike
        (b'"hyperparameters": {"max_grad_norm": 1e999}', "hyperparameters.max_grad_norm"),
        (b'"hyperparameters": {"max_grad_norm": NaN}', "hyperparameters.max_grad_norm"),
        (b'"hyperparameters": {"seed": 100000000000000000000000000000}', "hyperparameters.seed"),
        (b'"hyperparameters": {"warmup_steps": 99999999999}', "hyperparameters.warmup_steps"),
        (b'"adapter": {"type": "full", "layers": [99999999999999999999]}', "adapter.layers.0"),
    ],
    ids=["surrogate", "infinity", "nan", "huge-seed", "huge-warmup", "huge-layer"],
)
def test_spec_values_that_are_no_text_or_no_finite_number_are_422(api, raw, param):
    with client_for(api) as client:
        forget = file_id(client)
        body = (
            b'{"method": "catnip", "base_model": "tiny", "forget_file": "'
            + forget.encode()
            + b'", '
            + raw
            + b"}"
        )
        error = error_of(
            client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"}), 422
        )
        assert error["param"] == param, error
        listed = client.get("/v1/jobs")
        assert listed.status_code == 200 and listed.json()["data"] == [], listed.text


def test_empty_and_malformed_references_are_422_not_500(api):
    """An empty or malformed forget_file is a 422 (invalid_spec or file_not_found), with
    or without an Idempotency-Key (not idempotency_key_reused); so are a NUL in
    base_model and an unknown one."""
    with client_for(api) as client:
        error_of(client.post("/v1/jobs", json=job_body("")), 422, "invalid_spec")
        error_of(
            client.post("/v1/jobs", json=job_body(""), headers={"Idempotency-Key": "k1"}),
            422,
            "invalid_spec",
        )
        error_of(client.post("/v1/jobs", json=job_body("file-\x00")), 422, "invalid_spec")
        error_of(client.post("/v1/jobs", json=job_body("not-a-file-id")), 422, "file_not_found")
        forget = file_id(client)
        error_of(
            client.post("/v1/jobs", json=job_body(forget, base_model="tiny\x00")),
            422,
            "invalid_spec",
        )
        error_of(
            client.post("/v1/jobs", json=job_body(forget, base_model="m" * 300)),
            422,
            "unknown_model",
        )


def test_nul_and_overflows_in_paths_and_queries_are_4xx(api):
    """A NUL in a path id or a cursor, and an event cursor or a limit past what the
    database holds (2^63 and up), are 4xx on SQLite and Postgres alike; a file name's
    NUL and control characters are dropped."""
    with client_for(api) as client:
        for url in (
            "/v1/jobs/job-%00",
            "/v1/files/file-%00abc",
            "/v1/jobs?after=%00",
            "/v1/files?after=x%00y",
            "/v1/models?after=%00",
        ):
            response = client.get(url)
            assert 400 <= response.status_code < 500, (url, response.text)
        response = client.post("/v1/jobs", json=job_body(file_id(client)))
        job = response.json()["id"]
        for after in ("9223372036854775808", "-1", "1e3", "99999999999999999999999999"):
            assert client.get(f"/v1/jobs/{job}/events", params={"after": after}).status_code == 422
        assert client.get("/v1/jobs", params={"limit": str(10**30)}).status_code == 422
        boundary = b"b0undary"
        multipart = (
            b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nforget\r\n'
            b'--b0undary\r\nContent-Disposition: form-data; name="file"; '
            b'filename="ev\x00il\x07.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
            + QA
            + b"\r\n--b0undary--\r\n"
        )
        named = client.post(
            "/v1/files",
            content=multipart,
            headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()},
        )
        assert named.status_code == 201, named.text
        assert named.json()["filename"] == "evil.jsonl"


# --- work, limits and fair share ------------------------------------------------------


def test_the_work_of_a_job_is_bounded(api):
    """A job's work is bounded at submission: 1000 epochs over a text file is a 422
    job_too_large naming max_steps, and a job past the tenant's MAX_JOB_TOKENS one naming
    that budget; once the operator raises the tenant's budget, the same job is
    accepted."""
    from core.service import repo

    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with client_for(api, new_key(api, tenant)) as client:
        text = file_id(client, content=b"word " * 8000, name="book.txt")
        error = error_of(
            client.post(
                "/v1/jobs",
                json=job_body(
                    text, hyperparameters={"epochs": 1000, "batch_size": 1, "max_length": 8}
                ),
            ),
            422,
            "job_too_large",
        )
        assert "1000000" in error["message"] and "max_steps" in error["message"]
        error = error_of(
            client.post(
                "/v1/jobs",
                json=job_body(
                    text, hyperparameters={"max_steps": 1000, "batch_size": 64, "max_length": 4096}
                ),
            ),
            422,
            "job_too_large",
        )
        assert "10,000,000 per job" in error["message"] and "MAX_JOB_TOKENS" in error["message"]
        with api["sessions"].begin() as session:  # the operator raises this tenant's budget
            repo.lock_tenant(session, tenant).max_job_tokens = 10**12
        ok = client.post(
            "/v1/jobs",
            json=job_body(
                text, hyperparameters={"max_steps": 1000, "batch_size": 64, "max_length": 4096}
            ),
        )
        assert ok.status_code == 201, ok.text


def test_active_jobs_and_stored_bytes_are_limited_per_tenant(api):
    """One tenant cannot fill the queue or the disk: past MAX_ACTIVE_JOBS a job is a 429
    with Retry-After while another tenant's is accepted, and an upload past
    MAX_STORED_BYTES is a 413 that leaves nothing in the store."""
    with client_for(api) as client, client_for(api) as other:
        forget = file_id(client)
        for _ in range(3):
            assert client.post("/v1/jobs", json=job_body(forget)).status_code == 201
        refused = client.post("/v1/jobs", json=job_body(forget))
        error_of(refused, 429, "too_many_active_jobs")
        assert int(refused.headers["Retry-After"]) > 0
        assert other.post("/v1/jobs", json=job_body(file_id(other))).status_code == 201
        store = api["settings"].local_store
        kept = sorted(p.name for p in store.rglob("*") if p.is_file()) if store.exists() else []
        error = error_of(upload(client, content=QA * 400), 413, "storage_quota_exceeded")
        assert "MAX_STORED_BYTES" in error["message"]
        if api["backend"] == "sqlite":  # nothing of the refused upload stays in the store
            assert sorted(p.name for p in store.rglob("*") if p.is_file()) == kept


def test_rate_limits_answer_429_per_tenant_and_are_shared_by_api_processes(api):
    """READ_RATE_LIMIT 10/minute: a key's first 10 reads are 200 and the next are 429 with
    Retry-After, while another key still gets a 200. With the stack's Redis, two API
    processes count one tenant's requests together."""
    settings = api["settings"].model_copy(update={"read_rate_limit": "10/minute"})
    noisy, quiet = new_key(api), new_key(api)
    with serve(settings) as first, serve(settings) as second:
        servers = [first, second] if api["backend"] == "postgres" else [first, first]
        statuses = []
        for index in range(14):
            url = servers[index % 2].url
            response = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {noisy}"})
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["error"]["code"] == "rate_limited"
        assert statuses[:10] == [200] * 10 and statuses[10:] == [429] * 4, statuses
        assert (
            httpx.get(
                f"{first.url}/v1/jobs", headers={"Authorization": f"Bearer {quiet}"}
            ).status_code
            == 200
        )


def test_reads_and_writes_have_budgets_of_their_own(api):
    """With the default limits, one tenant's 200 status polls at once (a wall of
    dashboards) are all answered, none 429, while its writes past RATE_LIMIT's 20 a
    second are 429 with Retry-After, and a download counts as a write; its reads go on
    being answered meanwhile."""
    from core.service.settings import Settings

    defaults = Settings.model_fields
    settings = api["settings"].model_copy(
        update={
            "rate_limit": defaults["rate_limit"].default,
            "read_rate_limit": defaults["read_rate_limit"].default,
        }
    )
    key = new_key(api)
    with serve(settings) as server:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            job = client.post("/v1/jobs", json=job_body(file_id(client))).json()
        with ThreadPoolExecutor(max_workers=50) as pool:
            polls = list(
                pool.map(
                    lambda _: httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=headers),
                    range(200),
                )
            )
        assert [r.status_code for r in polls] == [200] * 200
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            writes = [client.post(f"/v1/jobs/{job['id']}/cancel").status_code for _ in range(25)]
            assert 429 in writes and writes.count(429) <= 25 - 18, writes
            download = client.get(f"/v1/jobs/{job['id']}/artifacts/adapter")
            error_of(download, 429, "rate_limited")  # a download spends the write budget
            assert "rate limit (20/second;600/minute)" in download.json()["error"]["message"]
            assert client.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_a_tenant_holds_at_most_its_share_of_event_streams(api):
    """MAX_STREAMS_PER_TENANT 2: a tenant's third open stream is a 429 `too_many_streams`
    with Retry-After, counted in the metric, while another tenant opens one; a stream
    that ends (the client leaves) gives its slot back."""
    import contextlib

    from prometheus_client import REGISTRY

    settings = api["settings"].model_copy(update={"max_streams_per_tenant": 2})
    refused_before = REGISTRY.get_sample_value("unlearn_event_streams_refused_total") or 0
    with serve(settings) as server, contextlib.ExitStack() as open_streams:
        key, other_key = new_key(api), new_key(api)
        client = open_streams.enter_context(client_for(api, key))
        other = open_streams.enter_context(client_for(api, other_key))
        client.base_url = other.base_url = httpx.URL(server.url)
        job = client.post("/v1/jobs", json=job_body(file_id(client))).json()
        url = f"/v1/jobs/{job['id']}/events/stream"
        for _ in range(2):
            response = open_streams.enter_context(client.stream("GET", url))
            assert response.status_code == 200
        refused = client.get(url)
        error = error_of(refused, 429, "too_many_streams")
        assert "MAX_STREAMS_PER_TENANT=2" in error["message"]
        assert int(refused.headers["Retry-After"]) > 0
        refused_now = REGISTRY.get_sample_value("unlearn_event_streams_refused_total")
        assert refused_now == refused_before + 1
        other_job = other.post("/v1/jobs", json=job_body(file_id(other))).json()
        with other.stream("GET", f"/v1/jobs/{other_job['id']}/events/stream") as theirs:
            assert theirs.status_code == 200
        open_streams.close()  # the tenant's two streams end
    with serve(settings) as server, client_for(api, key) as client:
        client.base_url = httpx.URL(server.url)
        with client.stream("GET", url) as first, client.stream("GET", url) as second:
            assert first.status_code == second.status_code == 200


def test_a_stream_without_events_is_closed_at_its_idle_lifetime_and_resumes(api):
    """STREAM_IDLE_SECONDS 1.5: a stream of a queued job carries its first event, then a
    ping, and is closed with a comment once 1.5 s passed without an event; its slot is
    free again, and a client that reconnects with Last-Event-ID gets what followed. The
    stream outlives BODY_TIMEOUT_SECONDS (1 s here): that deadline is for the request's
    body, not for the wait for a client to leave."""
    from core.service import repo
    from tests.service.flow import sse_events

    settings = api["settings"].model_copy(
        update={"stream_idle_seconds": 1.5, "max_streams_per_tenant": 1}
    )
    with serve(settings) as server, client_for(api) as client:
        client.base_url = httpx.URL(server.url)
        job = client.post("/v1/jobs", json=job_body(file_id(client))).json()
        url = f"/v1/jobs/{job['id']}/events/stream"
        started = time.monotonic()
        with client.stream("GET", url) as response:
            lines = list(response.iter_lines())
        lasted = time.monotonic() - started
        assert 1.5 <= lasted < 6, lasted
        assert lines[0] == "id: 1" and "event: status" in lines
        assert lines[-2] == ": no event for 1.5 s: reconnect with Last-Event-ID", lines
        with api["sessions"].begin() as session:
            repo.add_event(session, job["id"], "message", "later", {})
        with client.stream("GET", url, headers={"Last-Event-ID": "1"}) as response:
            assert response.status_code == 200  # the closed stream's slot was given back
            resumed = sse_events(response)
        assert [(e["id"], e["event"]) for e in resumed] == [("2", "message")]


@pytest.mark.parametrize("per_client", [256, 0], ids=["capped", "uncapped"])
def test_one_client_s_idle_connections_do_not_take_the_api_down(api, per_client):
    """1,000 connections from one address (127.0.0.2), each a request line and half its
    headers, reconnecting whenever closed, against the server's own options
    (MAX_CONNECTIONS 1000): with MAX_CONNECTIONS_PER_CLIENT 256 (its default) a tenant's
    requests from another address all answer 200 (their latency is printed); without
    the cap (0) the same flood makes them 503, uvicorn's answer at MAX_CONNECTIONS."""
    settings = api["settings"].model_copy(
        update={"header_timeout_seconds": 10.0, "max_connections_per_client": per_client}
    )
    with serve(settings) as server, client_for(api) as client:
        client.base_url = httpx.URL(server.url)
        assert client.get("/v1/jobs").status_code == 200
        with IdleFlood(server.port, 1000) as flood:
            flood.wait_sent()
            statuses, seconds = [], []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                started = time.monotonic()
                statuses.append(client.get("/v1/jobs").status_code)
                seconds.append(time.monotonic() - started)
                time.sleep(0.02)
        assert flood.opened >= 1000
    if per_client:
        assert statuses == [200] * len(statuses), sorted(set(statuses))
        assert flood.closed_by_server > 0  # the connections past 256 were turned away
        ordered = sorted(seconds)
        print(
            f"[{api['backend']}] {len(seconds)} requests under the flood: p50 "
            f"{ordered[len(ordered) // 2] * 1000:.1f} ms, p99 "
            f"{ordered[int(len(ordered) * 0.99)] * 1000:.1f} ms; the flood opened "
            f"{flood.opened} connections"
        )
    else:
        assert statuses.count(503) > len(statuses) / 2, statuses


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_each_of_several_limits_refuses_with_its_own_retry_after(storage, redis_url):
    """ "3/second;4/minute" on one key: three requests go through and the fourth is
    refused by the second's window (Retry-After 1), not counted in the minute's; a second
    later one goes through (the minute's fourth) and the next is refused by the minute's
    window (Retry-After near 60). On Redis a request that goes through costs one script
    call per limit (a test before each count would double them)."""
    import asyncio

    import redis

    from api.auth import RateLimiter

    limiter = RateLimiter("memory://" if storage == "memory" else redis_url)
    key = f"tenant:{uuid.uuid4().hex}"
    server = redis.Redis.from_url(redis_url)

    def script_calls() -> int:
        return int(server.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    async def requests() -> tuple[list[int | None], int]:
        await limiter.retry_after("3/second;4/minute", f"{key}-warm")  # scripts loaded
        before = script_calls()
        waits = [await limiter.retry_after("3/second;4/minute", key) for _ in range(3)]
        calls = script_calls() - before
        waits.append(await limiter.retry_after("3/second;4/minute", key))
        await asyncio.sleep(1.1)
        waits += [await limiter.retry_after("3/second;4/minute", key) for _ in range(2)]
        return waits, calls

    waits, calls = asyncio.run(requests())
    assert waits[:3] == [None] * 3 and waits[3] == 1 and waits[4] is None, waits
    assert waits[5] is not None and 55 <= waits[5] <= 60, waits
    if storage == "redis":
        assert calls == 3 * 2, calls


# --- faults ---------------------------------------------------------------------------


def test_a_database_that_is_down_is_503_with_retry_after(api, tmp_path, redis_url):
    """With the database down, reads and writes (with a cached key or an unknown one)
    are 503 database_unavailable with Retry-After, and /readyz says the database is
    unavailable without naming its host, port or driver messages."""
    if api["backend"] == "postgres":
        proxy = TcpProxy(5432)
        url = api["settings"].database_url
        settings = api["settings"].model_copy(
            update={
                "database_url": url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"),
                "auth_cache_seconds": 60.0,
            }
        )
    else:
        proxy = None
        settings = api["settings"]
    key = new_key(api)
    with (
        serve(settings) as server,
        httpx.Client(
            base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as client,
    ):
        forget = file_id(client)
        assert client.get("/v1/jobs").status_code == 200  # the key is cached from here
        if proxy is not None:
            proxy.stop()
            down = [
                client.get("/v1/jobs"),
                client.post("/v1/jobs", json=job_body(forget)),
                httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": "Bearer ul_other"}),
            ]
        else:  # SQLite: another process holds the write lock past the busy timeout
            holder = sqlite3.connect(str(settings.unlearn_data_dir / "unlearn.db"))
            holder.execute("BEGIN EXCLUSIVE")
            down = [
                client.post("/v1/jobs", json=job_body(forget)),
                client.post("/v1/jobs", json=job_body(forget)),
            ]
        try:
            for response in down:
                error_of(response, 503, "database_unavailable")
                assert int(response.headers["Retry-After"]) > 0
            if proxy is not None:
                ready = httpx.get(f"{server.url}/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["database"] == "unavailable"
                text = ready.text.lower()
                assert not any(
                    word in text for word in ("5432", "127.0.0.1", "psycopg", "connection")
                )
        finally:
            if proxy is not None:
                proxy.close()
            else:
                holder.rollback()
                holder.close()


def test_a_rate_limit_store_that_is_down_or_busy_is_503_not_500(api, redis_url):
    """The rate limit's Redis behind a proxy: up, a burst of 150 concurrent requests on one
    process (more than its pool of Redis connections; on a path that needs the key and
    the limit but no database) all get their answer, a 404, waiting for a connection
    rather than failing when the pool is empty; with Redis gone, a request with a valid
    key and one without are 503 with Retry-After. The wait for a connection is long here
    (on a busy two-core host, a burst through this Python proxy can take over the default
    5 s for a few requests, which are then, as designed, 503). With Redis a second slow and a
    wait of 50 ms (RATE_LIMIT_WAIT_SECONDS), a burst is answered in part and the rest,
    which found every connection taken, are 503 with Retry-After."""
    from api.auth import RATE_LIMIT_CONNECTIONS

    proxy = TcpProxy(6379)
    redis = redis_url.replace("127.0.0.1:6379", f"127.0.0.1:{proxy.port}")
    settings = api["settings"].model_copy(
        update={"rate_limit_storage_url": redis, "rate_limit_wait_seconds": 50.0}
    )
    key = new_key(api)
    try:
        with serve(settings) as server:
            auth = {"Authorization": f"Bearer {key}"}
            assert httpx.get(f"{server.url}/v1/jobs", headers=auth).status_code == 200  # cached
            assert RATE_LIMIT_CONNECTIONS < 150
            with ThreadPoolExecutor(150) as pool:
                burst = list(
                    pool.map(
                        lambda _: httpx.get(f"{server.url}/v1/nowhere", headers=auth, timeout=60),
                        range(150),
                    )
                )
            assert [r.status_code for r in burst] == [404] * 150
            proxy.stop()
            for headers in (auth, {"Authorization": "Bearer ul_unknown"}):
                response = httpx.get(f"{server.url}/v1/jobs", headers=headers, timeout=30)
                error_of(response, 503, "rate_limit_unavailable")
                assert int(response.headers["Retry-After"]) > 0
    finally:
        proxy.close()
    # busy: Redis answers a second late, so the pool's connections are all taken, and a
    # request waits 50 ms for one: those that get none are 503, the others answered
    slow = TcpProxy(6379, delay=1.0)
    busy = settings.model_copy(
        update={
            "rate_limit_storage_url": redis_url.replace("127.0.0.1:6379", f"127.0.0.1:{slow.port}"),
            "rate_limit_wait_seconds": 0.05,
        }
    )
    try:
        with serve(busy) as server, ThreadPoolExecutor(100) as pool:
            auth = {"Authorization": f"Bearer {key}"}
            burst = list(
                pool.map(
                    lambda _: httpx.get(f"{server.url}/v1/nowhere", headers=auth, timeout=60),
                    range(100),
                )
            )
        codes = [r.status_code for r in burst]
        assert set(codes) == {404, 503}, codes
        for response in burst:
            if response.status_code == 503:
                error_of(response, 503, "rate_limit_unavailable")
                assert int(response.headers["Retry-After"]) > 0
    finally:
        slow.close()


def test_hundreds_of_concurrent_requests_all_get_their_answer(api):
    """400 requests at once, on routes whose session is used by a dependency (the file)
    and by the route (the list), are all answered 200: the requests waiting for one of
    the API's threads cannot hold every connection of the pool (with every thread then
    waiting for a connection, nothing would move until the pool's wait ran out). (A
    server of its own: this module's cuts off a request whose head takes over a second
    to read, which 400 at once on a busy machine may.)"""
    import asyncio

    key = new_key(api)
    with client_for(api, key) as client:
        file = file_id(client)
    auth = {"Authorization": f"Bearer {key}"}
    # 400 connections from one address: more than MAX_CONNECTIONS_PER_CLIENT lets in
    # (its own test floods with and without it), so no per-client cap here.
    patient = {
        "header_timeout_seconds": 60.0,
        "body_timeout_seconds": 60.0,
        "max_connections_per_client": 0,
    }

    async def burst(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60, limits=limits) as c:
            paths = [f"/v1/files/{file}", "/v1/jobs"] * 200
            answers = await asyncio.gather(*(c.get(path) for path in paths))
            return [answer.status_code for answer in answers]

    with serve(api["settings"].model_copy(update=patient)) as server:
        assert asyncio.run(burst(server.url)) == [200] * 400


def test_a_broker_that_is_down_never_yields_an_id_that_vanishes(api):
    """With the broker down, a retry carrying the same Idempotency-Key while the first
    request still waits on the broker is a 409 request_in_progress with Retry-After (never a job
    id that then 404s), the first is a 503, no job is listed, and once the broker is back
    the same key creates the job."""
    from api.app import create_app
    from api.queue import TaskQueue

    entered, release = threading.Event(), threading.Event()

    class DownBroker(TaskQueue):
        def send(self, job_id: str, queue: str | None = None) -> None:
            entered.set()
            release.wait(10)
            raise ConnectionError("the broker is down")

    app = create_app(api["settings"])
    app.state.queue = DownBroker(api["settings"])
    key = new_key(api)
    with (
        ThreadServer(app) as server,
        httpx.Client(
            base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as client,
    ):
        body = job_body(file_id(client))
        headers = {"Idempotency-Key": "ticket-1"}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/jobs", json=body, headers=headers)
            assert entered.wait(10)
            retry = client.post("/v1/jobs", json=body, headers=headers)
            error_of(retry, 409, "request_in_progress")
            assert retry.headers["Retry-After"] == "1"
            release.set()
            error_of(first.result(), 503, "queue_unavailable")
            assert int(first.result().headers["Retry-After"]) > 0
        assert client.get("/v1/jobs").json()["data"] == []
    with client_for(api, key) as client:  # the broker is back: the same key creates the job
        created = client.post("/v1/jobs", json=body, headers=headers)
        assert created.status_code == 201, created.text
        assert client.get(f"/v1/jobs/{created.json()['id']}").status_code == 200


# --- races ----------------------------------------------------------------------------


def test_deleting_a_file_while_a_job_naming_it_is_created(api):
    """20 rounds of a job created at the same moment as its forget file is deleted: never
    a 500, and exactly one of them wins, in the database (a 201 and a 409 file_in_use, or
    the delete and a 422 file_not_found)."""
    with client_for(api) as client:
        for _ in range(20):
            forget = file_id(client)
            barrier = threading.Barrier(2)

            def at_once(call, *args, barrier=barrier, **kwargs):
                barrier.wait()
                return call(*args, **kwargs)

            with ThreadPoolExecutor(2) as pool:
                job = pool.submit(at_once, client.post, "/v1/jobs", json=job_body(forget))
                deleted = pool.submit(at_once, client.delete, f"/v1/files/{forget}")
                job, deleted = job.result(), deleted.result()
            assert job.status_code < 500 and deleted.status_code < 500, (job.text, deleted.text)
            if job.status_code == 201:
                error_of(deleted, 409, "file_in_use")
                client.post(f"/v1/jobs/{job.json()['id']}/cancel")
            else:
                assert deleted.status_code == 200, deleted.text
                error_of(job, 422, "file_not_found")


def test_concurrent_cancels_record_one_event(api):
    """Ten concurrent cancels of one job, queued or running, record its 'job cancelled'
    or 'cancel requested' event once, on SQLite as on Postgres; each answer is a 200 or
    a 409."""
    from core.service.db import Job

    with client_for(api) as client:
        forget = file_id(client)
        for round_ in range(4):
            queued = client.post("/v1/jobs", json=job_body(forget)).json()["id"]
            running = client.post("/v1/jobs", json=job_body(forget)).json()["id"]
            with api["sessions"].begin() as session:
                job = session.get(Job, running)
                job.status, job.lease_owner = "running", "worker-1"
            for job_id, message in ((queued, "job cancelled"), (running, "cancel requested")):
                barrier = threading.Barrier(10)

                def cancel(_, job_id=job_id, barrier=barrier):
                    barrier.wait()
                    return client.post(f"/v1/jobs/{job_id}/cancel")

                with ThreadPoolExecutor(10) as pool:
                    answers = list(pool.map(cancel, range(10)))
                assert all(a.status_code in (200, 409) for a in answers), [
                    (a.status_code, a.text) for a in answers if a.status_code not in (200, 409)
                ]
                events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
                assert [e["message"] for e in events].count(message) == 1, (round_, events)
            with api["sessions"].begin() as session:  # end it, to stay within the job limit
                session.get(Job, running).status = "cancelled"


# --- evidence, ids and leaks ------------------------------------------------------------


def test_eval_files_of_finished_jobs_stay_as_tombstones(api):
    """Deleting an eval file a finished job used leaves a tombstone, as forget and retain
    files do: hidden from the API (404), its row kept as deleted with its sha256."""
    from core.service.db import File, Job

    with client_for(api) as client:
        forget, questions = file_id(client), file_id(client, purpose="eval")
        job = client.post("/v1/jobs", json=job_body(forget, eval={"forget_qa": questions})).json()[
            "id"
        ]
        with api["sessions"].begin() as session:
            session.get(Job, job).status = "succeeded"
        assert client.delete(f"/v1/files/{questions}").status_code == 200
        assert client.get(f"/v1/files/{questions}").status_code == 404  # hidden from the API
        with api["sessions"]() as session:
            row = session.get(File, questions)
            assert row is not None and row.status == "deleted" and row.sha256


def test_event_ids_are_numbered_per_job(api):
    """Event ids are numbered per job (1, 2, ... for each), not one sequence across
    every tenant, so a tenant cannot count everyone's."""
    with client_for(api) as first, client_for(api) as second:
        jobs = []
        for client in (first, second, first):
            job = client.post("/v1/jobs", json=job_body(file_id(client))).json()["id"]
            client.post(f"/v1/jobs/{job}/cancel")
            jobs.append((client, job))
        for client, job in jobs:
            ids = [e["id"] for e in client.get(f"/v1/jobs/{job}/events").json()["data"]]
            assert ids == ["1", "2"], ids


def test_failure_messages_name_no_paths_sql_or_hosts(tmp_path):
    """A failed job's message carries no raw SQL or parameters and no local path (a
    registered model's directory shows as its name, any other path as <path>), and the
    worker's host:pid is not among what it shows."""
    from sqlalchemy.exc import IntegrityError

    from core.service.settings import Settings
    from worker.redaction import Redactions
    from worker.runner import JobRunner, _unexpected

    sql = IntegrityError(
        "INSERT INTO jobs (id, tenant) VALUES (%(id)s, %(tenant)s)",
        {"id": "job-1", "tenant": "acme-secret"},
        Exception("duplicate key"),
    )
    code, message = _unexpected(sql)
    assert code == "database_error" and "INSERT" not in message and "acme-secret" not in message
    runner = JobRunner(Settings(unlearn_data_dir=tmp_path), None, None, owner="host-9:123")  # type: ignore[arg-type]
    redactions = Redactions(runner.settings.work_dir, {"/srv/models/llama": "model 'llama'"})
    shown = redactions.redact(
        "cannot load /srv/models/llama/config.json; FileNotFoundError: "
        f"'{tmp_path}/store/jobs/job-1/checkpoint.tar' and '/var/cache/hf/x.bin'"
    )
    assert shown == (
        "cannot load model 'llama'/config.json; FileNotFoundError: '<path>' and '<path>'"
    ), shown
    assert "host-9" not in json.dumps(runner.__dict__.get("_redactions"))


def test_a_spec_that_cannot_be_written_back_is_refused_before_any_row():
    """Whatever check_values misses, the spec is written as strict UTF-8 JSON before a row
    exists: a value that cannot be (a lone surrogate, a NaN) is a 422, not a job that breaks
    its tenant's list afterwards."""
    from api.services.jobs import _check_serialisable
    from core.errors import SpecError

    _check_serialisable({"method": "catnip", "eval": {"max_samples": 3}})
    for bad in ({"x": "\ud800"}, {"x": float("nan")}, {"x": [float("inf")]}):
        with pytest.raises(SpecError, match="cannot be stored as JSON"):
            _check_serialisable(bad)
