"""The API over real HTTP (uvicorn) on Postgres + Redis: uploads and their validation,
auth and tenancy, job validation, idempotency, pagination, the error envelope. No worker
runs here, so jobs stay queued; the end-to-end tests run them."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.service.conftest import ThreadServer, finish_with_adapter, stack_settings

QA = b'{"prompt": "Who rides Vex?", "response": "Ona rides Vex."}\n' * 3
BIG = b'{"text": "' + b"a dragon sleeps " * 7000 + b'"}\n'  # > validate_inline_bytes


@pytest.fixture(scope="module")
def service(migrated_pg, redis_url, tmp_path_factory, fixture_dir):
    from api.app import create_app
    from core.service import repo

    # This module is about the API's behaviour, not its limits (test_hardening.py is).
    settings, sessions = stack_settings(
        migrated_pg,
        redis_url,
        tmp_path_factory.mktemp("api"),
        "api",
        max_upload_bytes=200_000,
        validate_inline_bytes=100_000,
    )
    with sessions.begin() as session:
        repo.add_model(session, "tiny", str(fixture_dir / "model"))
        _, key_a = repo.create_key(session, "tenant-a")
        _, key_b = repo.create_key(session, "tenant-b")
    with ThreadServer(create_app(settings)) as server:
        yield {"url": server.url, "a": key_a, "b": key_b, "settings": settings}


@pytest.fixture
def client(service):
    with httpx.Client(
        base_url=service["url"], headers={"Authorization": f"Bearer {service['a']}"}, timeout=30
    ) as c:
        yield c


def upload(client, content: bytes, purpose: str = "forget", name: str = "f.jsonl"):
    return client.post("/v1/files", data={"purpose": purpose}, files={"file": (name, content)})


def assert_error(response, status: int, code: str, *, param: str | None = None, contains: str = ""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    if param is not None:
        assert body["error"]["param"] == param, body
    assert contains in body["error"]["message"], body
    return body["error"]


def valid_file(client, purpose="forget", content=QA, name="f.jsonl") -> str:
    response = upload(client, content, purpose, name)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "valid", response.json()
    return response.json()["id"]


def job_body(forget_file: str, **over) -> dict:
    return {
        "method": "catnip",
        "base_model": "tiny",
        "forget_file": forget_file,
        "hyperparameters": {"max_steps": 2},
        **over,
    }


# --- uploads ---------------------------------------------------------------------------


def test_valid_upload_records_size_hash_and_kind(client):
    import hashlib

    response = upload(client, QA)
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "valid" and body["kind"] == "qa" and body["records"] == 3
    assert body["bytes"] == len(QA) and body["sha256"] == hashlib.sha256(QA).hexdigest()
    assert client.get(f"/v1/files/{body['id']}").json()["sha256"] == body["sha256"]


@pytest.mark.parametrize(
    "content, line, field, words",
    [
        (QA + b'{"prompt": "x", "response": \n', 4, None, "not valid JSON"),
        (b'{"prompt": "a"}\n', 1, "response", "missing"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 3, None, "binary"),
        (b"", None, None, "empty"),
        (b'{"prompt": "a", "response": "\xff\xfe"}\n', 1, None, "UTF-8"),
    ],
)
def test_bad_files_are_invalid_with_a_report_naming_the_line(client, content, line, field, words):
    response = upload(client, content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "invalid"
    problem = body["validation"]["problems"][0]
    assert problem["line"] == line and words in problem["message"], problem
    if field:
        assert problem["field"] == field
    assert body["validation"]["summary"].startswith("f.jsonl is invalid")


def test_upload_over_the_cap_is_413_and_leaves_nothing(client, service):
    before = client.get("/v1/files", params={"limit": 100}).json()["data"]
    store = service["settings"].local_store
    objects_before = sorted(p.name for p in store.rglob("*") if p.is_file())
    assert_error(upload(client, b"x" * 300_000), 413, "file_too_large")
    assert client.get("/v1/files", params={"limit": 100}).json()["data"] == before
    assert sorted(p.name for p in store.rglob("*") if p.is_file()) == objects_before


def test_upload_errors(client):
    assert_error(upload(client, QA, purpose="training"), 422, "invalid_request", param="purpose")
    assert_error(
        client.post("/v1/files", data={"purpose": "forget"}), 422, "invalid_request", param="file"
    )
    assert_error(upload(client, QA, name="notes.pdf"), 400, "unsupported_file_type", param="file")


def validated(client, file_id: str, timeout: float = 30) -> dict:
    """The file once its background validation has ended (it runs after the upload's
    answer was sent): polled until its status leaves `validating`, within `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while (body := client.get(f"/v1/files/{file_id}").json())["status"] == "validating":
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    return body


def test_large_upload_is_validated_in_the_background(client):
    response = upload(client, BIG)
    assert response.status_code == 201
    assert response.json()["status"] == "validating"
    final = validated(client, response.json()["id"])
    assert final["status"] == "valid" and final["kind"] == "text"


def test_a_validator_fault_makes_the_file_invalid_not_a_500_or_stuck(client, monkeypatch):
    """A bug in the validator (here: it raises RecursionError) makes the file `invalid`
    with a problem that names the error, for a small upload as for a large one validated
    in the background: never a 500, never a file left in `validating` for good."""
    import api.services.files

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(api.services.files, "validate_file", broken)
    small = upload(client, QA)
    assert small.status_code == 201, small.text
    big = upload(client, BIG)
    assert big.status_code == 201 and big.json()["status"] == "validating"
    final = validated(client, big.json()["id"])
    for body in (small.json(), final):
        assert body["status"] == "invalid", body
        assert body["validation"]["problems"] == [
            {
                "line": None,
                "field": None,
                "message": "could not be validated (RecursionError); this is a "
                "fault of the service, not known to be one of the file: report it to the operator",
            }
        ]


def test_delete_file(client):
    file_id = valid_file(client)
    assert client.delete(f"/v1/files/{file_id}").json()["deleted"] is True
    assert_error(client.get(f"/v1/files/{file_id}"), 404, "file_not_found")


# --- auth and tenancy ------------------------------------------------------------------


def test_no_key_and_wrong_key_are_401(service):
    response = httpx.get(f"{service['url']}/v1/jobs")
    assert_error(response, 401, "missing_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(
        httpx.get(f"{service['url']}/v1/jobs", headers={"Authorization": "Bearer ul_nope"}),
        401,
        "invalid_api_key",
    )
    assert_error(
        httpx.get(f"{service['url']}/v1/jobs", headers={"Authorization": "Basic abc"}),
        401,
        "invalid_api_key",
    )


def test_other_tenants_ids_answer_404(client, service):
    file_id = valid_file(client)
    job = client.post("/v1/jobs", json=job_body(file_id)).json()
    with httpx.Client(
        base_url=service["url"], headers={"Authorization": f"Bearer {service['b']}"}
    ) as other:
        assert_error(other.get(f"/v1/files/{file_id}"), 404, "file_not_found")
        assert_error(other.get(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
        assert_error(other.get(f"/v1/jobs/{job['id']}/events"), 404, "job_not_found")
        assert_error(other.post(f"/v1/jobs/{job['id']}/cancel"), 404, "job_not_found")
        assert_error(other.delete(f"/v1/files/{file_id}"), 404, "file_not_found")
        # ... and a job naming another tenant's file is refused
        assert_error(
            other.post("/v1/jobs", json=job_body(file_id)),
            422,
            "file_not_found",
            param="forget_file",
        )
        assert all(j["id"] != job["id"] for j in other.get("/v1/jobs").json()["data"])


# --- jobs ------------------------------------------------------------------------------


def test_init_from_job_is_the_tenants_own_succeeded_job_on_the_same_model(client, service):
    """Sequential unlearning's rules at submission: another tenant's job (or no job) is a
    404, a job that has not succeeded a 409, another base model or too long a chain a 422;
    an accepted job records the chain."""
    from core.service import repo
    from core.service.db import Job, make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(service["settings"].db_url))
    forget = valid_file(client)
    first = client.post("/v1/jobs", json=job_body(forget)).json()
    assert (first["init_from_job"], first["chain"]) == (None, [])
    after_first = job_body(forget, init_from_job=first["id"])
    error = assert_error(
        client.post("/v1/jobs", json=after_first), 409, "job_not_succeeded", param="init_from_job"
    )
    assert "is queued" in error["message"]
    with httpx.Client(
        base_url=service["url"], headers={"Authorization": f"Bearer {service['b']}"}
    ) as other:
        theirs = job_body(valid_file(other), init_from_job=first["id"])
        assert_error(
            other.post("/v1/jobs", json=theirs), 404, "job_not_found", param="init_from_job"
        )
    for missing in ("job-0000000000000000", "file-0123", "../../etc"):
        assert_error(
            client.post("/v1/jobs", json=job_body(forget, init_from_job=missing)),
            404,
            "job_not_found",
            param="init_from_job",
        )

    with sessions.begin() as session:
        session.get(Job, first["id"]).status = "succeeded"
        if repo.find_model(session, "tiny-2") is None:
            repo.add_model(session, "tiny-2", repo.get_model(session, "tiny").uri)
    response = client.post("/v1/jobs", json=after_first)
    assert response.status_code == 201, response.text
    second = response.json()
    assert (second["init_from_job"], second["chain"]) == (first["id"], [first["id"]])
    assert client.get(f"/v1/jobs/{second['id']}").json()["chain"] == [first["id"]]
    assert_error(
        client.post("/v1/jobs", json={**after_first, "base_model": "tiny-2"}),
        422,
        "base_model_mismatch",
        param="base_model",
        contains="a chain stays on one base model",
    )
    with sessions.begin() as session:
        session.get(Job, second["id"]).status = "succeeded"
        session.delete(repo.get_model(session, "tiny-2"))  # the module's other tests see one model
    limit = service["settings"].max_chain_jobs
    try:
        service["settings"].max_chain_jobs = 1
        assert_error(
            client.post("/v1/jobs", json=job_body(forget, init_from_job=second["id"])),
            422,
            "chain_too_long",
            param="init_from_job",
        )
    finally:
        service["settings"].max_chain_jobs = limit


def test_job_validation_errors(client):
    file_id = valid_file(client)
    assert_error(
        client.post("/v1/jobs", json=job_body(file_id, method="rmu2")),
        422,
        "invalid_spec",
        param="method",
        contains="valid methods: catnip, catnip_ref, catnip_seq, flat, ga, npo, rmu, rmu_star",
    )
    assert_error(  # each method's data, enforced before a job exists
        client.post("/v1/jobs", json=job_body(file_id, method="rmu")),
        422,
        "invalid_spec",
        param="retain_file",
        contains="method rmu needs a retain_file",
    )
    assert_error(
        client.post("/v1/jobs", json=job_body(file_id, contrast_file=file_id)),
        422,
        "invalid_spec",
        param="contrast_file",
        contains="method catnip does not use contrast responses",
    )
    assert_error(
        client.post("/v1/jobs", json=job_body(file_id, hyperparameters={"learning_rate": -1})),
        422,
        "invalid_spec",
        param="hyperparameters.learning_rate",
    )
    assert_error(
        client.post("/v1/jobs", json=job_body(file_id, base_model="llama-70b")),
        422,
        "unknown_model",
        param="base_model",
        contains="tiny",
    )
    assert_error(
        client.post("/v1/jobs", json=job_body(file_id, base_model="/etc/passwd")),
        422,
        "unknown_model",
    )
    assert_error(
        client.post("/v1/jobs", json=job_body("file-missing")),
        422,
        "file_not_found",
        param="forget_file",
    )
    assert_error(
        client.post(
            "/v1/jobs",
            content=b'{"method": "catnip",',
            headers={"content-type": "application/json"},
        ),
        400,
        "invalid_json",
    )
    assert_error(client.post("/v1/jobs", json=[1, 2]), 422, "invalid_request")
    assert_error(
        client.post("/v1/jobs", json=job_body(file_id, adapter={"type": "qlora"})),
        422,
        "invalid_spec",
        param="adapter.type",
    )


def test_job_refuses_invalid_and_wrong_purpose_files(client):
    bad = upload(client, b'{"prompt": "a"}\n').json()["id"]
    assert_error(
        client.post("/v1/jobs", json=job_body(bad)),
        422,
        "file_not_valid",
        param="forget_file",
        contains="line 1",
    )
    retain = valid_file(client, purpose="retain")
    assert_error(
        client.post("/v1/jobs", json=job_body(retain)),
        422,
        "wrong_file_purpose",
        param="forget_file",
    )
    mc = valid_file(
        client, purpose="eval", content=b'{"question": "q?", "choices": ["a", "b"], "answer": 0}\n'
    )
    forget = valid_file(client)
    assert_error(
        client.post("/v1/jobs", json=job_body(forget, eval={"forget_qa": mc})),
        422,
        "wrong_file_kind",
        param="eval.forget_qa",
    )
    # FLAT's contrast set is uploaded with purpose contrast, and only that goes in the slot
    assert_error(
        client.post("/v1/jobs", json=job_body(forget, method="flat", contrast_file=forget)),
        422,
        "wrong_file_purpose",
        param="contrast_file",
    )
    contrast = valid_file(client, purpose="contrast")
    created = client.post("/v1/jobs", json=job_body(forget, method="flat", contrast_file=contrast))
    assert created.status_code == 201, created.text
    assert created.json()["contrast_file"] == contrast


def test_a_contrast_set_that_cannot_fit_is_refused_at_submission(client):
    """What the files' validation shows of FLAT's contrast set is refused before the job
    exists (a 422 naming contrast_file), not when it runs: a text forget set without a
    contrast_file, a contrast set in another format, or with another number of records.
    Other methods do not read one."""
    text = valid_file(client, content=b'{"text": "Ona rides Vex over the hills."}\n')
    assert_error(
        client.post("/v1/jobs", json=job_body(text, method="flat")),
        422,
        "contrast_mismatch",
        param="contrast_file",
        contains="needs a contrast_file",
    )
    qa = valid_file(client)  # 3 records
    two = valid_file(client, purpose="contrast", content=(QA.split(b"\n")[0] + b"\n") * 2)
    chat = valid_file(
        client,
        purpose="contrast",
        content=b'{"messages": [{"role": "user", "content": "Who rides Vex?"}, '
        b'{"role": "assistant", "content": "I do not know."}]}\n' * 3,
    )
    for contrast, words in ((two, "2 records"), (chat, "holds chat records")):
        assert_error(
            client.post("/v1/jobs", json=job_body(qa, method="flat", contrast_file=contrast)),
            422,
            "contrast_mismatch",
            param="contrast_file",
            contains=words,
        )
    for method in ("catnip", "npo", "ga"):
        assert client.post("/v1/jobs", json=job_body(text, method=method)).status_code == 201
    assert client.post("/v1/jobs", json=job_body(qa, method="flat")).status_code == 201


def test_create_get_cancel_and_events(client):
    file_id = valid_file(client)
    response = client.post("/v1/jobs", json=job_body(file_id))
    assert response.status_code == 201
    job = response.json()
    assert job["status"] == "queued" and job["hyperparameters"]["beta"] == 1.0  # paper default
    assert job["hyperparameters"]["learning_rate"] == 1e-5
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_not_cancellable")
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["data"]["status"] for e in events["data"]] == ["queued", "cancelled"]
    assert client.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"] is None
    assert_error(client.get(f"/v1/jobs/{job['id']}/artifacts/adapter"), 404, "artifact_not_found")


def test_idempotency_key(client):
    file_id = valid_file(client)
    headers = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/v1/jobs", json=job_body(file_id), headers=headers)
    again = client.post("/v1/jobs", json=job_body(file_id), headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert_error(
        client.post("/v1/jobs", json=job_body(file_id, method="ga"), headers=headers),
        422,
        "idempotency_key_reused",
        param="Idempotency-Key",
    )


def test_cursor_pagination_walks_every_job_once(client):
    file_id = valid_file(client)
    created = {client.post("/v1/jobs", json=job_body(file_id)).json()["id"] for _ in range(5)}
    seen, after = [], None
    while True:
        page = client.get(
            "/v1/jobs", params={"limit": 2, **({"after": after} if after else {})}
        ).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(seen) == len(set(seen)) and created <= set(seen)
    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["data"]
    assert all(j["status"] == "queued" for j in queued)
    assert_error(
        client.get("/v1/jobs", params={"after": "job-nope"}), 404, "job_not_found", param="after"
    )
    assert_error(client.get("/v1/jobs", params={"limit": 0}), 422, "invalid_request", param="limit")


def test_models_health_and_unknown_routes(client, service):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert httpx.get(f"{service['url']}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{service['url']}/readyz").json()
    assert ready == {
        "status": "ready",
        "checks": {"database": "ok", "storage": "ok", "broker": "ok"},
    }
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.put("/v1/jobs"), 405, "method_not_allowed")
    response = client.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"


def test_openapi_documents_every_method_and_field(client):
    schema = client.get("/openapi.json").json()
    job = schema["components"]["schemas"]["JobCreate"]
    assert job["properties"]["method"]["enum"] == [
        "catnip",
        "catnip_ref",
        "catnip_seq",
        "flat",
        "ga",
        "npo",
        "rmu",
        "rmu_star",
        "simnpo",
    ]
    rmu = schema["components"]["schemas"]["RMUParams"]["properties"]
    assert (rmu["steering_coeff"]["default"], rmu["alpha"]["default"]) == (20.0, 100.0)
    assert "contrast_file" in job["properties"]
    catnip = schema["components"]["schemas"]["CatnipParams"]["properties"]
    assert catnip["beta"]["default"] == 1.0 and "token_stride" in catnip
    assert schema["components"]["schemas"]["SimNPOParams"]["properties"]["gamma"]["default"] == 0.0
    assert json.dumps(schema).count("Idempotency-Key") >= 1


def test_every_response_field_is_documented(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    undocumented = [
        f"{name}.{field}"
        for name in (
            "FileObject",
            "JobObject",
            "Progress",
            "EventObject",
            "ArtifactObject",
            "ModelObject",
            "MetricsObject",
            "ValidationOut",
            "ProblemOut",
            "JobError",
            "ErrorBody",
        )
        for field, prop in schemas[name]["properties"].items()
        if field != "object" and not prop.get("description")
    ]
    assert undocumented == []


def test_files_of_active_jobs_cannot_be_deleted(client):
    forget = valid_file(client)
    eval_qa = valid_file(client, purpose="eval")
    job = client.post("/v1/jobs", json=job_body(forget, eval={"forget_qa": eval_qa})).json()
    for file_id in (forget, eval_qa):  # the forget set and an eval file named in the spec
        assert_error(client.delete(f"/v1/files/{file_id}"), 409, "file_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/files/{eval_qa}").json()["deleted"] is True


def test_artifact_downloads_resume_with_ranges_and_answer_304_to_their_etag(client, service):
    """From the local store: `Range` (and `If-Range`) give the bytes asked for, a range
    past the end is a 416, `If-None-Match` with the archive's sha256 a 304; each served
    download (a part included) is in the audit log, a 304 is not."""
    import os

    from core.service.db import make_engine, make_sessionmaker

    job = client.post("/v1/jobs", json=job_body(valid_file(client))).json()
    url = f"/v1/jobs/{job['id']}/artifacts/adapter"
    assert_error(client.get(url), 409, "job_not_finished")
    payload = os.urandom(100_000)
    sessions = make_sessionmaker(make_engine(service["settings"].db_url))
    sha = finish_with_adapter(service["settings"], sessions, job["id"], payload)

    full = client.get(url)
    assert full.status_code == 200 and full.content == payload
    assert full.headers["etag"] == f'"{sha}"' and full.headers["accept-ranges"] == "bytes"
    assert full.headers["x-checksum-sha256"] == sha
    part = client.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == payload[1000:2000]
    assert part.headers["content-range"] == "bytes 1000-1999/100000"
    resumed = client.get(url, headers={"Range": "bytes=99000-", "If-Range": f'"{sha}"'})
    assert resumed.status_code == 206 and resumed.content == payload[99000:]
    assert client.get(url, headers={"Range": "bytes=-100"}).content == payload[-100:]
    changed = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"another"'})
    assert changed.status_code == 200 and changed.content == payload  # not the same archive
    assert client.get(url, headers={"Range": "bytes=200000-"}).status_code == 416
    for tags in (f'"{sha}"', f'W/"{sha}"', f'"x", "{sha}"', "*"):
        cached = client.get(url, headers={"If-None-Match": tags})
        assert cached.status_code == 304 and cached.content == b"", tags
        assert cached.headers["etag"] == f'"{sha}"'
    assert client.get(url, headers={"If-None-Match": '"x"'}).status_code == 200

    entries = client.get("/v1/audit", params={"limit": 1000}).json()["data"]
    downloads = [
        e for e in entries if e["subject"] == job["id"] and e["action"] == "artifact.downloaded"
    ]
    # 200, 206 x3, the If-Range 200, the 416 (recorded as asked for) and the "x" 200
    assert len(downloads) == 7
    assert downloads[1]["data"]["range"] == "bytes=1000-1999"


def test_gets_answer_304_while_their_json_is_unchanged(client):
    """A job, a list and a job's events carry a weak ETag of their JSON; If-None-Match with
    it is a 304 without a body until the job changes. Errors and POSTs carry none."""
    created = client.post("/v1/jobs", json=job_body(valid_file(client)))
    assert "etag" not in created.headers
    job = created.json()
    for url in (f"/v1/jobs/{job['id']}", "/v1/jobs?limit=3", f"/v1/jobs/{job['id']}/events"):
        first = client.get(url)
        etag = first.headers["etag"]
        assert first.status_code == 200 and etag.startswith('W/"'), first.headers
        cached = client.get(url, headers={"If-None-Match": etag})
        assert cached.status_code == 304 and cached.content == b"", url
        assert cached.headers["etag"] == etag and cached.headers["x-request-id"]
        assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    before = client.get(f"/v1/jobs/{job['id']}").headers["etag"]
    client.post(f"/v1/jobs/{job['id']}/cancel")
    changed = client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": before})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != before
    missing = client.get("/v1/jobs/job-" + "0" * 24, headers={"If-None-Match": "*"})
    assert missing.status_code == 404 and "etag" not in missing.headers


def test_many_polls_of_a_job_make_one_query_per_interval(service):
    """The status cache: within its interval, polls of one job are answered from memory
    (one query for 40 polls, the same body and ETag, a 304 for the ETag); another tenant
    polling the same id still gets its 404; `Cache-Control: no-cache` reads it fresh; a
    change the worker writes shows once the interval is over (at once to the Python
    client); with the cache off every poll is a query."""
    from sqlalchemy import event, update

    from api.app import create_app
    from api.client import Client
    from core.service.db import Job

    def serve(seconds: float):
        app = create_app(service["settings"].model_copy(update={"status_cache_seconds": seconds}))
        queries: list[str] = []
        engine = app.state.sessions.kw["bind"]
        event.listen(
            engine,
            "before_cursor_execute",
            lambda _c, _cur, statement, *_: (
                queries.append(statement) if "FROM jobs" in statement else None
            ),
        )
        return app, queries

    def job_queries(queries: list[str]) -> int:
        return sum(1 for q in queries if "jobs.id = " in q)

    auth = {"Authorization": f"Bearer {service['a']}"}
    for seconds, expected in ((60.0, 1), (0.0, 40)):
        app, queries = serve(seconds)
        with ThreadServer(app) as server, httpx.Client(base_url=server.url, headers=auth) as c:
            job = c.post("/v1/jobs", json=job_body(valid_file(c))).json()
            queries.clear()
            answers = [c.get(f"/v1/jobs/{job['id']}") for _ in range(40)]
            assert job_queries(queries) == expected, seconds
            assert {a.content for a in answers} == {answers[0].content}
            assert {a.headers["etag"] for a in answers} == {answers[0].headers["etag"]}
            etag = answers[0].headers["etag"]
            again = c.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b""
            other = c.get(
                f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {service['b']}"}
            )
            assert other.status_code == 404
            queries.clear()  # Cache-Control: no-cache is answered fresh, every time
            fresh = [
                c.get(f"/v1/jobs/{job['id']}", headers={"Cache-Control": "no-cache"})
                for _ in range(3)
            ]
            assert job_queries(queries) == 3 and {f.status_code for f in fresh} == {200}

    app, queries = serve(1.0)
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, headers=auth) as c:
        job = c.post("/v1/jobs", json=job_body(valid_file(c))).json()
        assert c.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] == 0

        def progress(step: int) -> None:  # what a worker's progress update does
            with app.state.sessions.begin() as session:
                session.execute(update(Job).where(Job.id == job["id"]).values(step=step))

        progress(7)
        changed = time.monotonic()
        assert c.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] == 0  # cached
        while c.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] != 7:
            assert time.monotonic() - changed < 5, "the cached answer outlived its interval"
            time.sleep(0.02)
        progress(9)
        client = Client(server.url, api_key=service["a"])
        assert client.get_job(job["id"])["progress"]["step"] == 9  # the client reads fresh


def test_metadata_is_kept_returned_and_filterable(client):
    """Jobs and files take a small map of strings, returned everywhere and filterable in
    lists; a bad one is a 422 naming the key."""
    upload = client.post(
        "/v1/files",
        data={"purpose": "forget", "metadata": json.dumps({"ticket": "T-17", "team": "legal"})},
        files={"file": ("f.jsonl", QA)},
    )
    assert upload.status_code == 201, upload.text
    file = upload.json()
    assert file["metadata"] == {"ticket": "T-17", "team": "legal"}
    assert client.get(f"/v1/files/{file['id']}").json()["metadata"] == file["metadata"]
    listed = client.get("/v1/files", params={"metadata[ticket]": "T-17"}).json()["data"]
    assert [f["id"] for f in listed] == [file["id"]]

    jobs = []
    for ticket in ("T-17", "T-18"):
        body = job_body(file["id"], metadata={"ticket": ticket, "team": "legal"})
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        jobs.append(response.json())
    assert jobs[0]["metadata"] == {"ticket": "T-17", "team": "legal"}
    assert client.get(f"/v1/jobs/{jobs[1]['id']}").json()["metadata"]["ticket"] == "T-18"
    found = client.get("/v1/jobs", params={"metadata[ticket]": "T-18", "metadata[team]": "legal"})
    assert [j["id"] for j in found.json()["data"]] == [jobs[1]["id"]]
    none = client.get("/v1/jobs", params={"metadata[ticket]": "T-18", "metadata[team]": "ops"})
    assert none.json()["data"] == []
    assert client.post("/v1/jobs", json=job_body(file["id"])).json()["metadata"] == {}

    for metadata, param in (
        ({"ticket": 17}, "metadata.ticket"),
        ({"bad key!": "x"}, "metadata"),
        ({"ticket": "x" * 501}, "metadata.ticket"),
        ({f"k{i}": "v" for i in range(51)}, "metadata"),
        (["T-17"], "metadata"),
    ):
        assert_error(
            client.post("/v1/jobs", json=job_body(file["id"], metadata=metadata)),
            422,
            "invalid_spec",
            param=param,
        )
    assert_error(
        client.post(
            "/v1/files",
            data={"purpose": "forget", "metadata": "{not json"},
            files={"file": ("f.jsonl", QA)},
        ),
        422,
        "invalid_spec",
        param="metadata",
    )
    assert_error(client.get("/v1/jobs", params={"metadata[a b]": "x"}), 422, "invalid_spec")


def test_the_event_stream_resumes_with_last_event_id_and_ends_at_a_final_status(client, service):
    """A client reads part of a queued job's live stream and leaves; events follow; it
    comes back with Last-Event-ID and gets each later event once, in order, then the
    `end` event once the job is cancelled. Another tenant's stream is a 404."""
    from core.service import repo
    from core.service.db import make_engine, make_sessionmaker
    from tests.service.flow import sse_events

    sessions = make_sessionmaker(make_engine(service["settings"].db_url))
    job = client.post("/v1/jobs", json=job_body(valid_file(client))).json()
    url = f"/v1/jobs/{job['id']}/events/stream"

    def add(*messages: str) -> None:
        with sessions.begin() as session:
            for message in messages:
                repo.add_event(session, job["id"], "message", message, {"m": message})

    add("one", "two", "three")  # after event 1, "job queued"
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        first = sse_events(response, until=lambda e: e.get("id") == "3")
    assert [e["id"] for e in first] == ["1", "2", "3"]
    assert json.loads(first[1]["data"])["message"] == "one" and first[1]["event"] == "message"

    add("four", "five")
    client.post(f"/v1/jobs/{job['id']}/cancel")  # queued: cancelled at once, a status event
    with client.stream("GET", url, headers={"Last-Event-ID": "3"}) as response:
        rest = sse_events(response)
    assert [e.get("id") for e in rest] == ["4", "5", "6", "7", None]
    assert [json.loads(e["data"])["message"] for e in rest[:3]] == ["three", "four", "five"]
    assert rest[3]["event"] == "status" and rest[-1]["event"] == "end"
    assert json.loads(rest[-1]["data"]) == {"status": "cancelled"}
    listed = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["id"] for e in first + rest[:-1]] == [e["id"] for e in listed]
    with client.stream("GET", url, params={"after": 6}) as response:
        assert [e.get("id") for e in sse_events(response)] == ["7", None]

    assert_error(client.get(url, headers={"Last-Event-ID": "x"}), 422, "invalid_spec")
    with httpx.Client(
        base_url=service["url"], headers={"Authorization": f"Bearer {service['b']}"}
    ) as other:
        assert_error(other.get(url), 404, "job_not_found")


def test_the_openapi_document_is_valid_with_stable_ids_security_and_examples(client):
    """The document validates as OpenAPI 3.1; operation ids are the route names; every
    /v1 operation but the public key list asks for the bearer key; the request bodies
    have examples (the job's is a valid spec); every route's 200 is typed."""
    from openapi_spec_validator import validate

    from core.engine.spec import parse_spec

    schema = client.get("/openapi.json").json()
    validate(schema)
    operations = {
        (path, method): op for path, ops in schema["paths"].items() for method, op in ops.items()
    }
    ids = [op["operationId"] for op in operations.values()]
    assert len(set(ids)) == len(ids) and not [i for i in ids if "_v1_" in i], ids
    assert operations[("/v1/jobs", "post")]["operationId"] == "create_job"
    for (path, _), op in operations.items():
        public = not path.startswith("/v1/") or path == "/v1/signing-keys"
        assert ("security" in op) != public, path
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    job_example = schema["components"]["schemas"]["JobCreate"]["examples"][0]
    parse_spec({k: v for k, v in job_example.items() if k != "metadata"})
    upload = operations[("/v1/files", "post")]["requestBody"]["content"]["multipart/form-data"]
    upload_schema = schema["components"]["schemas"][upload["schema"]["$ref"].split("/")[-1]]
    assert upload_schema["examples"][0]["purpose"] == "forget"
    for (path, method), op in operations.items():  # every JSON request body has one
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            name = body["schema"]["$ref"].split("/")[-1]
            assert schema["components"]["schemas"][name].get("examples"), (path, method)
    deleted = operations[("/v1/files/{file_id}", "delete")]["responses"]["200"]
    assert deleted["content"]["application/json"]["schema"]["$ref"].endswith("/FileDeleted")
    for (path, method), op in operations.items():  # the error envelope, declared
        for code in ("400", "401", "404", "422", "429", "500", "503"):
            content = op["responses"][code]["content"]["application/json"]["schema"]
            assert content["$ref"].endswith("/ErrorEnvelope"), (path, method, code)


def test_metrics_are_scraped_without_a_key_with_jobs_from_the_database(client, service):
    """/metrics answers Prometheus (no key): request latency by route template (a path
    no route matched is `unmatched`, not its own series) and the jobs by status, counted
    in the database."""
    client.post("/v1/jobs", json=job_body(valid_file(client)))
    client.get("/v1/no-such-thing-12345")
    response = httpx.get(f"{service['url']}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    queued = next(x for x in text.splitlines() if x.startswith('unlearn_jobs{status="queued"}'))
    assert float(queued.split()[-1]) >= 1
    assert 'route="unmatched"' in text and "no-such-thing" not in text
    assert 'route="/v1/jobs"' in text and "unlearn_oldest_queued_job_seconds" in text


def test_metrics_show_what_workers_measured_of_finished_jobs(client, service):
    """Time queued, training speed and peak memory come from the jobs table (the workers
    write them there): a summary over the last jobs, by device type."""
    from datetime import timedelta

    from core.service.db import Job, make_engine, make_sessionmaker

    def scrape() -> dict[str, float]:
        text = httpx.get(f"{service['url']}/metrics").text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(("unlearn_job_queue", "unlearn_job_tokens", "unlearn_job_peak"))
        }

    before = scrape()
    job = client.post("/v1/jobs", json=job_body(valid_file(client))).json()
    sessions = make_sessionmaker(make_engine(service["settings"].db_url))
    with sessions.begin() as session:
        row = session.get(Job, job["id"])
        row.status = "succeeded"
        row.started_at = row.created_at + timedelta(seconds=7)
        row.finished_at = row.started_at + timedelta(seconds=30)
        row.metrics = {
            "timings_s": {"unlearn": 20.0},
            "throughput": {
                "device": "cuda",
                "steps_per_second": 2.5,
                "tokens_per_second": 9000.0,
                "peak_memory": {"device_bytes": 3 << 30, "host_bytes": 5 << 30},
            },
        }
    after = scrape()
    assert after["unlearn_job_queue_seconds_count"] == before["unlearn_job_queue_seconds_count"] + 1
    assert after["unlearn_job_queue_seconds_sum"] == pytest.approx(
        before["unlearn_job_queue_seconds_sum"] + 7
    )
    assert after['unlearn_job_tokens_per_second_sum{device="cuda"}'] == 9000.0
    assert after['unlearn_job_peak_memory_bytes{device="cuda",kind="device"}'] == 3 << 30
    assert after['unlearn_job_peak_memory_bytes{device="cuda",kind="host"}'] == 5 << 30


def test_methods_are_listed_with_their_hyperparameters_schema(client):
    """What the dashboard's form is built from: every method of the registry, what data
    it needs, and its hyperparameters' JSON Schema with the defaults a job gets."""
    from core.engine.spec.methods import METHODS

    listed = {m["id"]: m for m in client.get("/v1/methods").json()["data"]}
    assert set(listed) == set(METHODS)
    catnip = listed["catnip"]["hyperparameters"]["properties"]
    assert catnip["beta"]["default"] == METHODS["catnip"].params().beta
    assert catnip["learning_rate"]["exclusiveMinimum"] == 0
    assert listed["rmu"]["needs_retain"] and not listed["catnip"]["needs_retain"]
    assert listed["flat"]["uses_contrast"]
    job = client.post("/v1/jobs", json=job_body(valid_file(client))).json()
    assert job["hyperparameters"]["beta"] == catnip["beta"]["default"]
