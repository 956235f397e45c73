"""Webhooks against a real local receiver (an HTTP server on a free port) on Postgres:
registration and its refusals (SSRF), Standard Webhooks signatures verified with the
reference package, retries while the receiver is down, the schedule running out,
redelivery, and a worker process SIGKILLed in the middle of a delivery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from tests.service.conftest import (
    ROOT,
    ThreadServer,
    free_port,
    stack_settings,
    stop_process_group,
)

QA = b'{"prompt": "Who rides Vex?", "response": "Ona rides Vex."}\n'


class Receiver:
    """An endpoint that records what it is sent. `hang` holds the first request until
    released (a sender that dies while waiting); it can be started and stopped."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.received: list[dict] = []
        self.hang = False
        self.release = threading.Event()
        self.arrived = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append({"headers": dict(self.headers), "body": body})
                receiver.arrived.set()
                if receiver.hang and len(receiver.received) == 1:
                    receiver.release.wait(30)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture(scope="module")
def service(migrated_pg, redis_url, tmp_path_factory):
    from api.app import create_app
    from core.service import repo

    settings, sessions = stack_settings(
        migrated_pg,
        redis_url,
        tmp_path_factory.mktemp("webhooks"),
        "webhooks",
        webhook_allow_private=True,  # the receiver is on loopback
        webhook_retry_schedule=[1.0, 1.0, 1.0],
        webhook_lease_seconds=3,
    )
    with sessions.begin() as session:
        _, key = repo.create_key(session, "hooks-a")
        _, other = repo.create_key(session, "hooks-b")
    with ThreadServer(create_app(settings)) as server:
        yield {
            "url": server.url,
            "key": key,
            "other": other,
            "settings": settings,
            "sessions": sessions,
        }


def http(service, key: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=service["url"],
        headers={"Authorization": f"Bearer {key or service['key']}"},
        timeout=30,
    )


def upload(client: httpx.Client) -> str:
    response = client.post("/v1/files", data={"purpose": "forget"}, files={"file": ("f.jsonl", QA)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def deliveries(client: httpx.Client, webhook_id: str) -> list[dict]:
    response = client.get(f"/v1/webhooks/{webhook_id}/deliveries")
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_targets_on_private_addresses_are_refused_unless_allowed(service):
    from core.service.webhooks import UnsafeTarget, check_target

    for url in (
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest/meta-data",  # a cloud metadata service
        "http://[::1]/x",
        "https://192.168.0.10/x",
    ):
        with pytest.raises(UnsafeTarget):
            check_target(url, allow_private=False)
        check_target(url, allow_private=True)
    check_target("https://93.184.216.34/hook", allow_private=False)  # public: allowed
    for url in ("ftp://example.com/x", "https://user:pw@93.184.216.34/x", "not a url"):
        with pytest.raises(UnsafeTarget):
            check_target(url, allow_private=True)

    # The API, with the operator's default (private targets off), says why in a 422.
    from api.app import create_app

    strict = service["settings"].model_copy(update={"webhook_allow_private": False})
    with ThreadServer(create_app(strict)) as server:
        refused = httpx.post(
            f"{server.url}/v1/webhooks",
            json={"url": "http://127.0.0.1:8080/x", "event_types": ["job.succeeded"]},
            headers={"Authorization": f"Bearer {service['key']}"},
        )
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "unsafe_webhook_url" and error["param"] == "url"
    assert "WEBHOOK_ALLOW_PRIVATE" in error["message"]


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254 (cloud metadata)
        "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
        "http://[64:ff9b:1::a00:1]/",  # local-use NAT64 (RFC 8215)
        "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
        "http://[2002:a9fe:a9fe::1]/",  # 6to4 of 169.254.169.254
        "http://[::127.0.0.1]/",  # IPv4-compatible
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
        "http://[::ffff:0:a00:1]/",  # IPv4-translated 10.0.0.1
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo, client 192.0.2.45
        "http://[fec0::1]/",  # site-local
        "http://[fe80::1]/",  # link-local
        "http://[fc00::1]/",  # unique local
        "http://[::1]/",
        "http://[::]/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_every_form_of_a_non_public_target_is_refused(url):
    from core.service.webhooks import UnsafeTarget, check_target

    with pytest.raises(UnsafeTarget, match="WEBHOOK_ALLOW_PRIVATE"):
        check_target(url, allow_private=False)
    assert check_target(url, allow_private=True) == []  # allowed, and nothing resolved


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::5db8:d822]/",  # NAT64 of 93.184.216.34
        "http://[2002:5db8:d822::1]/",  # 6to4 of 93.184.216.34
        "https://[2606:4700::1111]/",
        "https://93.184.216.34/hook",
    ],
)
def test_public_targets_and_ipv6_forms_of_public_addresses_are_accepted(url):
    from core.service.webhooks import check_target

    assert [str(a) for a in check_target(url, allow_private=False)] == [
        url.split("//")[1].split("/")[0].strip("[]")
    ]


def test_a_name_that_rebinds_to_loopback_after_the_check_is_not_followed(monkeypatch):
    """A resolver that answers a public address to the check and loopback to any later
    look-up (DNS rebinding with a short TTL): the request goes to the checked address,
    with the name's Host header, and nothing connects to loopback. 127.0.0.2 stands for
    the public address (no traffic may leave this machine), so `refusal` takes it as
    public; 127.0.0.1 stays loopback."""
    import ipaddress
    import socket

    from core.service import webhooks

    real_getaddrinfo, real_refusal = socket.getaddrinfo, webhooks.refusal
    public = ipaddress.ip_address("127.0.0.2")
    monkeypatch.setattr(
        webhooks, "refusal", lambda address: None if address == public else real_refusal(address)
    )
    answers: list[str] = []

    def rebinding(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host != "hooks.rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        answers.append("127.0.0.2" if not answers else "127.0.0.1")
        return real_getaddrinfo(answers[-1], port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    checked = Receiver("127.0.0.2").start()
    loopback = Receiver("127.0.0.1", checked.port).start()
    try:
        settings = type("S", (), {"webhook_allow_private": False})()
        url = f"http://hooks.rebind.test:{checked.port}/hooks"
        record = webhooks._send(settings, url, b"{}", {"content-type": "application/json"})
        assert record["error"] is None and record["status_code"] == 204, record
        assert answers == ["127.0.0.2"]  # resolved once, by the check
        assert len(checked.received) == 1 and loopback.received == []
        sent = {name.lower(): value for name, value in checked.received[0]["headers"].items()}
        assert sent["host"] == f"hooks.rebind.test:{checked.port}"
        # The resolver would have sent a second look-up to loopback.
        assert socket.getaddrinfo("hooks.rebind.test", 80)[0][4][0] == "127.0.0.1"
    finally:
        checked.stop()
        loopback.stop()


def test_a_pinned_https_request_keeps_the_name_for_tls():
    """An https target is connected to by address, with the name as the TLS server name
    (so the certificate is checked against the name) and as the Host header."""
    import ipaddress

    from core.service.webhooks import pinned

    url, headers, extensions = pinned(
        "https://hooks.example.com:8443/in?x=1", ipaddress.ip_address("2606:4700::1111")
    )
    assert url == "https://[2606:4700::1111]:8443/in?x=1"
    assert headers == {"host": "hooks.example.com:8443"}
    assert extensions == {"sni_hostname": "hooks.example.com"}
    assert pinned("http://h.example/x", ipaddress.ip_address("93.184.216.34")) == (
        "http://93.184.216.34/x",
        {"host": "h.example"},
        {},
    )


def test_registration_the_secret_once_and_tenancy(service):
    with http(service) as client, http(service, service["other"]) as other:
        bad = client.post(
            "/v1/webhooks", json={"url": "http://127.0.0.1:1/x", "event_types": ["job.done"]}
        )
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "event_types"
        created = client.post(
            "/v1/webhooks",
            json={
                "url": "http://127.0.0.1:1/x",
                "event_types": ["job.succeeded"],
                "description": "ci",
            },
        )
        assert created.status_code == 201, created.text
        hook = created.json()
        assert hook["secret"].startswith("whsec_") and hook["id"].startswith("webhook-")
        shown = client.get(f"/v1/webhooks/{hook['id']}").json()
        assert shown["secret"] is None and shown["description"] == "ci"  # shown once only
        assert hook["id"] in [h["id"] for h in client.get("/v1/webhooks").json()["data"]]
        assert other.get(f"/v1/webhooks/{hook['id']}").status_code == 404
        assert other.delete(f"/v1/webhooks/{hook['id']}").status_code == 404
        assert other.get("/v1/webhooks").json()["data"] == []
        deleted = client.delete(f"/v1/webhooks/{hook['id']}")
        assert deleted.json() == {"id": hook["id"], "object": "webhook", "deleted": True}
        assert client.get(f"/v1/webhooks/{hook['id']}").status_code == 404
    # the same through the Python client
    from api.client import Client

    with Client(service["url"], service["key"]) as tenant:
        made = tenant.create_webhook("http://127.0.0.1:1/y", ["job.failed"], description="py")
        assert made["secret"].startswith("whsec_")
        assert [h["id"] for h in tenant.list_webhooks()] == [made["id"]]
        assert list(tenant.deliveries(made["id"])) == []
        assert tenant.delete_webhook(made["id"])["deleted"] is True
        assert list(tenant.list_webhooks()) == []


def test_a_signed_delivery_retried_until_the_receiver_is_back(service):
    from core.service.webhooks import deliver_due

    receiver = Receiver()  # not listening yet: the endpoint is down
    settings, sessions = service["settings"], service["sessions"]
    with http(service) as client:
        hook = client.post(
            "/v1/webhooks", json={"url": receiver.url, "event_types": ["file.validated"]}
        ).json()
        file_id = upload(client)  # validated inline: its delivery is in the same commit
        [pending] = deliveries(client, hook["id"])
        assert pending["status"] == "pending" and pending["event_type"] == "file.validated"

        assert deliver_due(sessions, settings, "test-sender") == 1
        [failed_once] = deliveries(client, hook["id"])
        assert failed_once["status"] == "pending" and len(failed_once["attempts"]) == 1
        assert failed_once["attempts"][0]["status_code"] is None
        assert "ConnectError" in failed_once["attempts"][0]["error"]
        assert deliver_due(sessions, settings, "test-sender") == 0  # not due for a second

        receiver.start()
        try:
            deadline = time.monotonic() + 10
            while deliver_due(sessions, settings, "test-sender") == 0:
                assert time.monotonic() < deadline, "the retry never came due"
                time.sleep(0.2)
            [delivered] = deliveries(client, hook["id"])
            assert delivered["status"] == "succeeded" and delivered["delivered_at"]
            assert [a["status_code"] for a in delivered["attempts"]] == [None, 204]
            [request] = receiver.received
            payload = Verifier(hook["secret"]).verify(request["body"], request["headers"])
            assert payload["type"] == "file.validated"
            assert payload["data"]["id"] == file_id and payload["data"]["status"] == "valid"
            assert request["headers"]["webhook-id"] == delivered["id"]
            # the check can fail: another body, or another secret, does not verify
            with pytest.raises(WebhookVerificationError):
                Verifier(hook["secret"]).verify(
                    request["body"].replace(b"valid", b"VALID"), request["headers"]
                )
            with pytest.raises(WebhookVerificationError):
                Verifier("whsec_" + "A" * 32).verify(request["body"], request["headers"])

            # Redelivery: the same message again, from the start of the schedule.
            again = client.post(f"/v1/webhooks/{hook['id']}/deliveries/{delivered['id']}/redeliver")
            assert again.status_code == 200 and again.json()["status"] == "pending"
            assert deliver_due(sessions, settings, "test-sender") == 1
            assert len(receiver.received) == 2
            assert receiver.received[1]["headers"]["webhook-id"] == delivered["id"]
        finally:
            receiver.stop()
        client.delete(f"/v1/webhooks/{hook['id']}")


def test_a_delivery_whose_schedule_runs_out_fails_with_every_attempt_listed(service):
    from core.service.webhooks import deliver_due

    short = service["settings"].model_copy(update={"webhook_retry_schedule": [0.1]})
    nobody = f"http://127.0.0.1:{free_port()}/gone"
    with http(service) as client:
        hook = client.post(
            "/v1/webhooks", json={"url": nobody, "event_types": ["file.validated"]}
        ).json()
        upload(client)
        deadline = time.monotonic() + 10
        while deliveries(client, hook["id"])[0]["status"] == "pending":
            assert time.monotonic() < deadline
            deliver_due(service["sessions"], short, "test-sender")
            time.sleep(0.15)
        [gone] = deliveries(client, hook["id"])
        assert gone["status"] == "failed" and len(gone["attempts"]) == 2
        assert gone["next_attempt_at"] is None
        # Sent again at the time, the target's check is repeated: with private targets
        # off now, the attempt is refused, not made.
        strict = short.model_copy(update={"webhook_allow_private": False})
        client.post(f"/v1/webhooks/{hook['id']}/deliveries/{gone['id']}/redeliver")
        deliver_due(service["sessions"], strict, "test-sender")
        assert deliveries(client, hook["id"])[0]["attempts"][-1]["error"].startswith("refused:")
        client.delete(f"/v1/webhooks/{hook['id']}")


def test_a_worker_killed_during_a_delivery_does_not_lose_it(service, tmp_path):
    receiver = Receiver()
    receiver.hang = True
    receiver.start()
    settings = service["settings"]
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "BROKER_URL": settings.broker_url,
        "UNLEARN_DATA_DIR": str(tmp_path),
        "TASK_QUEUE": "unlearn-webhooks-worker-test",
        "WORKER_DEVICE": "cpu",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_POLL_SECONDS": "0.2",
        "WEBHOOK_LEASE_SECONDS": "3",
        "WEBHOOK_RETRY_SCHEDULE": "[1, 1, 1]",
    }

    def start_worker() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "api", "worker"],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=(tmp_path / "worker.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    with http(service) as client:
        hook = client.post(
            "/v1/webhooks", json={"url": receiver.url, "event_types": ["file.validated"]}
        ).json()
        upload(client)
        worker = start_worker()
        try:
            assert receiver.arrived.wait(60), (tmp_path / "worker.log").read_text()[-2000:]
            os.killpg(worker.pid, signal.SIGKILL)  # in the middle of the request
            worker.wait(10)
            receiver.release.set()
            [held] = deliveries(client, hook["id"])
            assert held["status"] == "pending" and held["attempts"] == []  # never recorded
            worker = start_worker()  # takes it once the dead sender's lease has expired
            deadline = time.monotonic() + 60
            while deliveries(client, hook["id"])[0]["status"] != "succeeded":
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
                time.sleep(0.3)
        finally:
            stop_process_group(worker)
            receiver.stop()
        [done] = deliveries(client, hook["id"])
        assert [a["status_code"] for a in done["attempts"]] == [204]
        assert len(receiver.received) == 2  # at least once: the same message, twice
        ids = {r["headers"]["webhook-id"] for r in receiver.received}
        assert ids == {done["id"]}
        payload = json.loads(receiver.received[1]["body"])
        assert payload["type"] == "file.validated"
        client.delete(f"/v1/webhooks/{hook['id']}")
