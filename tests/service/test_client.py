"""The Python client (api.client) and the tenant CLI (`unlearn files|jobs`) against the
API over real HTTP on Postgres + Redis, no worker (jobs stay queued; the end-to-end tests
run jobs through the client). Where a network failure has to happen at a given moment,
a transport wrapper around httpx's real one makes it happen: the server is real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from api.client import FILE_SLOTS, APIError, ChecksumError, Client
from tests.service.conftest import ROOT, ThreadServer, finish_with_adapter, stack_settings

QA = '{"prompt": "Who rides Vex?", "response": "Ona rides Vex."}\n' * 3


@pytest.fixture(scope="module")
def service(migrated_pg, redis_url, tmp_path_factory, fixture_dir):
    from api.app import create_app
    from core.service import repo

    settings, sessions = stack_settings(
        migrated_pg, redis_url, tmp_path_factory.mktemp("client"), "client"
    )
    with sessions.begin() as session:
        repo.add_model(session, "tiny", str(fixture_dir / "model"))
        _, key = repo.create_key(session, "client-a")
        _, other = repo.create_key(session, "client-b")
        _, slow = repo.create_key(session, "client-slow")
        repo.lock_tenant(session, "client-slow").rate_limit = "2/second"
    with ThreadServer(create_app(settings)) as server:
        yield {
            "url": server.url,
            "key": key,
            "other": other,
            "slow": slow,
            "settings": settings,
            "sessions": sessions,
        }


@pytest.fixture
def client(service):
    with Client(service["url"], service["key"]) as c:
        yield c


class Faults(httpx.BaseTransport):
    """httpx's real transport, with a failure injected where `fail(request, n)` says:
    "before" (the request never leaves), "after" (it reaches the server, the answer is
    lost), or a byte count (the answer's body breaks off after that many bytes)."""

    def __init__(self, fail) -> None:  # type: ignore[no-untyped-def]
        self.inner = httpx.HTTPTransport()
        self.fail = fail
        self.seen: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        how = self.fail(request, len(self.seen))
        if how == "before":
            raise httpx.ConnectError("injected: no connection", request=request)
        response = self.inner.handle_request(request)
        if how == "after":
            response.read()
            response.close()
            raise httpx.ReadError("injected: the answer was lost", request=request)
        if isinstance(how, int):
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_BreakOff(response, how),
                request=request,
            )
        return response

    def close(self) -> None:
        self.inner.close()

    @classmethod
    def break_first(cls, fragment: str, after_bytes: int) -> Faults:
        """The first answer to a path holding `fragment` breaks off after `after_bytes`."""
        faults = cls(
            lambda request, n: (
                after_bytes
                if fragment in request.url.path
                and not any(fragment in r.url.path for r in faults.seen[:-1])
                else None
            )
        )
        return faults

    def sent_to(self, fragment: str, header: str) -> list[str | None]:
        """`header` of each request sent to a path holding `fragment`, in order."""
        return [r.headers.get(header) for r in self.seen if fragment in r.url.path]


class _BreakOff(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response, limit: int) -> None:
        self.response, self.limit = response, limit

    def __iter__(self):  # type: ignore[no-untyped-def]
        sent = 0
        for chunk in self.response.iter_raw():
            if sent + len(chunk) >= self.limit:
                yield chunk[: self.limit - sent]
                raise httpx.ReadError("injected: the connection broke")
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self.response.close()


def job_spec(forget: str, **over) -> dict:
    return {
        "method": "catnip",
        "base_model": "tiny",
        "forget_file": forget,
        "hyperparameters": {"max_steps": 2},
        **over,
    }


def forget_file(client: Client, tmp_path, **metadata: str) -> str:
    path = tmp_path / "forget.jsonl"
    path.write_text(QA)
    file = client.upload_file(path, "forget", metadata=metadata)
    assert file["status"] == "valid", file
    return file["id"]


def test_the_clients_file_slots_are_the_services():
    from core.service.enums import FILE_SLOTS as SERVICE_SLOTS

    assert FILE_SLOTS == {slot: purpose.value for slot, (purpose, _) in SERVICE_SLOTS.items()}


def test_files_and_jobs_round_trip_with_metadata_and_every_page(service, client, tmp_path):
    forget = forget_file(client, tmp_path, ticket="T-7")
    assert client.get_file(forget)["metadata"] == {"ticket": "T-7"}
    assert [f["id"] for f in client.list_files(metadata={"ticket": "T-7"})] == [forget]
    submitted = [
        client.submit_job(job_spec(forget, metadata={"batch": "paging"}))["id"] for _ in range(7)
    ]
    client.page_size = 3  # seven jobs over three pages
    listed = [j["id"] for j in client.list_jobs(metadata={"batch": "paging"})]
    assert listed == submitted[::-1]
    assert [j["id"] for j in client.list_jobs(metadata={"batch": "paging"}, limit=4)] == listed[:4]
    assert client.cancel_job(submitted[0])["status"] == "cancelled"
    assert [j["id"] for j in client.list_jobs(status="cancelled")] == [submitted[0]]
    assert client.metrics(submitted[1]) is None  # queued: no metrics yet
    with pytest.raises(APIError) as error:
        client.delete_file(forget)  # queued jobs use it
    assert error.value.status == 409 and error.value.request_id
    # Another tenant's client sees none of it: the ids answer 404.
    with Client(service["url"], service["other"]) as other:
        assert list(other.list_jobs()) == []
        with pytest.raises(APIError) as missing:
            other.get_job(submitted[1])
    assert (missing.value.status, missing.value.code) == (404, "job_not_found")


def test_a_lost_answer_to_a_submission_is_retried_into_the_same_job(service, client, tmp_path):
    forget = forget_file(client, tmp_path)
    posts = []

    def lose_first_answer(request: httpx.Request, n: int) -> str | None:
        if request.method == "POST" and request.url.path == "/v1/jobs":
            posts.append(request.headers["idempotency-key"])
            return "after" if len(posts) == 1 else None
        return None

    before = {j["id"] for j in client.list_jobs()}
    with Client(service["url"], service["key"], transport=Faults(lose_first_answer)) as flaky:
        job = flaky.submit_job(job_spec(forget))
    assert len(posts) == 2 and posts[0] == posts[1]  # the retry carried the same key
    created = {j["id"] for j in client.list_jobs()} - before
    assert created == {job["id"]}, created
    # Without the key the same two requests are two jobs: the check above can fail.
    client.submit_job(job_spec(forget), idempotency_key="a")
    client.submit_job(job_spec(forget), idempotency_key="b")
    assert len({j["id"] for j in client.list_jobs()} - before) == 3


def test_an_upload_is_retried_only_where_the_service_did_not_take_it(service, tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(QA)
    with Client(
        service["url"],
        service["key"],
        transport=Faults(lambda r, n: "before" if n == 1 else None),
    ) as flaky:
        assert flaky.upload_file(path, "forget")["status"] == "valid"
    lost = Faults(lambda r, n: "after" if r.method == "POST" else None)
    with Client(service["url"], service["key"], transport=lost) as flaky:
        with pytest.raises(httpx.ReadError):
            flaky.upload_file(path, "forget")  # it may have been stored: not sent twice
    assert [r.method for r in lost.seen] == ["POST"]


def test_rate_limited_calls_wait_what_retry_after_says(service, tmp_path):
    """The tenant's RATE_LIMIT (2/second here) counts what writes: uploads."""
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"prompt": "Who rides Vex?", "response": "Ona rides Vex."}\n')
    with (
        Client(service["url"], service["slow"], retries=0) as impatient,
        Client(service["url"], service["slow"], retries=5) as patient,
    ):
        with pytest.raises(APIError) as error:
            for _ in range(5):
                impatient.upload_file(path, "forget")
        assert error.value.status == 429 and (error.value.retry_after or 0) >= 1
        # the window is full this instant: the patient client's first call is a 429 it
        # waits out, and 5 calls at 2/second span at least two more windows
        started = time.monotonic()
        for _ in range(5):
            assert patient.upload_file(path, "forget")["status"] == "valid"
        assert time.monotonic() - started >= 1.5
        assert patient.models()[0]["id"] == "tiny"  # reads have a budget of their own


def test_downloads_resume_after_a_break_and_check_the_sha256(service, client, tmp_path):
    job = client.submit_job(job_spec(forget_file(client, tmp_path)))
    with pytest.raises(APIError) as early:
        client.download_artifact(job["id"], "adapter", tmp_path / "early")
    assert early.value.code == "artifact_not_found"
    payload = os.urandom(300_000)
    finish_with_adapter(service["settings"], service["sessions"], job["id"], payload)
    faults = Faults.break_first("/artifacts/adapter", 100_000)
    with Client(service["url"], service["key"], transport=faults) as flaky:
        archive = flaky.download_artifact(job["id"], "adapter", tmp_path / "out", unpack=False)
    assert archive.read_bytes() == payload
    ranges = faults.sent_to("/artifacts/adapter", "range")
    assert ranges == [None, "bytes=100000-"], ranges

    # A partial file that is not a prefix of the archive: the sha256 check catches it.
    part = tmp_path / "bad" / f"{job['id']}-adapter.tar.gz.part"
    part.parent.mkdir()
    part.write_bytes(b"x" * 1000)
    with pytest.raises(ChecksumError, match="download it again"):
        client.download_artifact(job["id"], "adapter", tmp_path / "bad", unpack=False)
    assert not part.exists()
    again = client.download_artifact(job["id"], "adapter", tmp_path / "bad", unpack=False)
    assert again.read_bytes() == payload


def test_following_a_job_reconnects_and_sees_each_event_once(service, client, tmp_path):
    from core.service import repo

    job = client.submit_job(job_spec(forget_file(client, tmp_path)))
    with service["sessions"].begin() as session:
        for n in range(6):
            repo.add_event(session, job["id"], "message", f"m{n}", {"n": n})
    client.cancel_job(job["id"])  # a final status: the stream ends
    faults = Faults.break_first("/events/stream", 700)
    with Client(service["url"], service["key"], transport=faults) as flaky:
        seen = []
        final = flaky.wait(job["id"], on_event=seen.append)
    listed = list(client.events(job["id"]))
    assert [e["id"] for e in seen] == [e["id"] for e in listed] == [str(n) for n in range(1, 9)]
    resumed = faults.sent_to("/events/stream", "last-event-id")
    assert len(resumed) == 2 and resumed[0] is None and resumed[1] is not None, resumed
    assert final["status"] == "cancelled"


def test_spec_files_are_uploaded_and_an_invalid_one_names_its_slot_and_line(client, tmp_path):
    (tmp_path / "forget.jsonl").write_text(QA)
    (tmp_path / "eval.jsonl").write_text(QA)
    spec = job_spec("forget.jsonl", eval={"forget_qa": "eval.jsonl", "retain_qa": "eval.jsonl"})
    uploaded = client.upload_spec_files(spec, tmp_path)
    assert uploaded["forget_file"].startswith("file-")
    assert uploaded["eval"]["forget_qa"] == uploaded["eval"]["retain_qa"]  # uploaded once
    assert client.get_file(uploaded["eval"]["forget_qa"])["purpose"] == "eval"
    assert spec["forget_file"] == "forget.jsonl"  # the caller's spec is left as it was
    (tmp_path / "bad.jsonl").write_text(QA + '{"prompt": "Q"}\n')
    with pytest.raises(ValueError, match=r"forget_file: .*bad.jsonl: line 4, field response"):
        client.upload_spec_files(job_spec("bad.jsonl"), tmp_path)


def unlearn(service, *args: str, key: str | None = None, **env: str):
    """`unlearn ARGS` as a tenant runs it: only the client's settings, and a Python that
    cannot import the server's, the database's or the engine's packages."""
    blocked = ["fastapi", "starlette", "sqlalchemy", "celery", "boto3", "torch", "transformers"]
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError(f'{name} is not installed for the client')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from api.cli import app\n"
        "app()\n"
    )
    environment = {
        "PATH": os.environ["PATH"],
        "UNLEARN_API_URL": service["url"],
        "UNLEARN_API_KEY": key or service["key"],
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", blocker, *args],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tenant_cli_works_without_the_servers_packages(service, client, tmp_path):
    (tmp_path / "forget.jsonl").write_text(QA)
    (tmp_path / "bad.jsonl").write_text(QA + "not json\n")
    (tmp_path / "spec.yaml").write_text(
        "method: catnip\nbase_model: tiny\nforget_file: forget.jsonl\n"
        "hyperparameters: {max_steps: 2}\n"
    )
    bad = unlearn(service, "files", "upload", str(tmp_path / "bad.jsonl"), "--purpose", "forget")
    assert bad.returncode == 1
    assert f"{tmp_path / 'bad.jsonl'}: line 4" in bad.stderr, bad.stderr
    submitted = unlearn(service, "jobs", "submit", str(tmp_path / "spec.yaml"), "-m", "ticket=C-1")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    job = client.get_job(job_id)
    assert job["metadata"] == {"ticket": "C-1"} and job["status"] == "queued"
    assert client.get_file(job["forget_file"])["metadata"] == {"ticket": "C-1"}
    listed = unlearn(service, "jobs", "list", "--metadata", "ticket=C-1")
    assert listed.returncode == 0 and listed.stdout.split("\t")[:3] == [job_id, "queued", "catnip"]
    got = unlearn(service, "jobs", "get", job_id)
    assert json.loads(got.stdout)["id"] == job_id
    cancelled = unlearn(service, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    waited = unlearn(service, "jobs", "wait", job_id)
    assert waited.returncode == 1 and f"{job_id} cancelled" in waited.stderr, waited.stderr
    files = unlearn(service, "files", "list", "--json")
    assert job["forget_file"] in {f["id"] for f in json.loads(files.stdout)}
    missing = unlearn(service, "jobs", "get", "job-" + "0" * 24)
    assert missing.returncode == 1 and "error [job_not_found]" in missing.stderr
    wrong_key = unlearn(service, "jobs", "list", key="ul_wrong")
    assert wrong_key.returncode == 1 and "invalid_api_key" in wrong_key.stderr
    unset = unlearn(service, "jobs", "list", UNLEARN_API_URL="")
    assert unset.returncode == 2 and "UNLEARN_API_URL" in unset.stderr
