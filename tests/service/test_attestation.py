"""Certificates as in-toto attestations and output models signed with OpenSSF model
signing, checked the way a supply-chain team checks them: with the in-toto library's own
DSSE verification and the `model_signing` command, given only the published keys, with
none of this project's verification code. A one-byte change to the envelope, the payload
or a weight file is refused by each; `unlearn verify` checks both, and still checks a
JSON certificate."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import SSlibKey
from typer.testing import CliRunner

from tests.service.conftest import add_job_row

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"


def _published(keyring) -> str:
    """GET /v1/signing-keys as the API serves it (api.schemas.SigningKeyObject)."""
    from api.schemas import SigningKeyObject
    from core.service.db import SigningKey
    from core.service.signing import public_pem

    keys = {**keyring.public_keys(), **keyring.model_public_keys()}
    rows = [SigningKey(id=kid, public_key_pem=public_pem(key)) for kid, key in keys.items()]
    for row in rows:
        row.created_at = datetime(2026, 1, 1)
    return json.dumps({"data": [SigningKeyObject.of(r).model_dump(mode="json") for r in rows]})


def _model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text('{"r": 16}')
    (directory / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    return directory


@pytest.fixture
def issued(tmp_path):
    """A succeeded job's outputs as the worker leaves them: the adapter directory signed
    and archived, and its certificate issued (SQLite, the real migrations)."""
    from core.service import attestation, certificates, repo
    from core.service.db import Artifact, Job, RegisteredModel, make_engine, make_sessionmaker
    from core.service.migrate import upgrade
    from core.service.signing import Keyring
    from core.service.storage import make_archive

    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    keyring = Keyring(tmp_path / "keys")
    adapter = _model(tmp_path / "out" / "adapter")
    attestation.sign_model(adapter, keyring)
    archive = tmp_path / "job-1-adapter.tar"
    sha256 = make_archive(adapter, archive)
    spec = {
        "method": "catnip",
        "eval": {"robustness": {"relearn": {"steps": 20}}, "privacy": {"k": 0.2}},
    }
    metrics = {
        "verdict": "pass",
        "criteria": [{"criterion": "utility_min_ratio", "passed": True}],
        "robustness": {
            "relearn": {"status": "done", "settings": {"steps": 20}, "recovery": 0.1},
            "in_context": {"status": "off", "reason": "needs a split of the forget set"},
        },
        "privacy": {"after": {"status": "off", "reason": "needs eval.holdout"}},
    }
    add_job_row(sessions, "job-1", status="succeeded", metrics=metrics)
    with sessions.begin() as session:
        session.get(Job, "job-1").spec = spec
        session.add(RegisteredModel(name="m", uri="/m", digest="sha256:" + "1" * 64))
        repo.replace_artifacts(
            session,
            "job-1",
            [
                Artifact(
                    job_id="job-1",
                    name="adapter",
                    kind="peft_adapter",
                    filename="job-1-adapter.tar",
                    bytes=archive.stat().st_size,
                    sha256=sha256,
                    storage_key="jobs/job-1/adapter.tar",
                )
            ],
        )
        session.flush()
        certificate = certificates.issue(session, session.get(Job, "job-1"), keyring)
    engine.dispose()
    (tmp_path / "keys.json").write_text(_published(keyring))
    return {
        "certificate": certificate,
        "keyring": keyring,
        "adapter": adapter,
        "archive": archive,
        "sha256": sha256,
        "tmp": tmp_path,
    }


def _in_toto_verifies(envelope: dict, listing: dict) -> bool:
    """in-toto's own DSSE check (in_toto.models.metadata.Envelope) with a published key."""
    from in_toto.exceptions import SignatureVerificationError
    from in_toto.models.metadata import Envelope
    from securesystemslib.exceptions import FormatError

    entry = next(k for k in listing["data"] if k["algorithm"] == "Ed25519")
    public = serialization.load_pem_public_key(entry["public_key_pem"].encode())
    key = SSlibKey.from_crypto(public, keyid=entry["id"]).to_dict() | {"keyid": entry["id"]}
    try:
        Envelope.from_dict(json.loads(json.dumps(envelope))).verify_signature(key)
    except (SignatureVerificationError, FormatError, ValueError, KeyError):
        return False
    return True


def test_the_certificate_verifies_with_in_toto_alone_and_any_change_is_refused(issued):
    certificate = issued["certificate"]
    listing = json.loads((issued["tmp"] / "keys.json").read_text())
    envelope = json.loads(certificate)
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert _in_toto_verifies(envelope, listing)
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == "https://unlearn-service.dev/unlearning-record/v1"
    assert statement["subject"] == [
        {"name": "job-1-adapter.tar", "digest": {"sha256": issued["sha256"]}}
    ]
    record = statement["predicate"]
    assert record["base_model"]["digest"] == "sha256:" + "1" * 64
    assert record["verdict"] == "pass" and record["spec"]["method"] == "catnip"
    # the record claims only what was run: each skipped audit says why
    assert record["audits"] == [
        {
            "audit": "robustness.in_context",
            "status": "off",
            "reason": "needs a split of the forget set",
        },
        {"audit": "robustness.relearn", "status": "done", "settings": {"steps": 20}},
        {"audit": "privacy.after", "status": "off", "reason": "needs eval.holdout"},
    ]
    assert record["model_signature"]["key_id"].startswith("ecdsa-p256-")

    changed_type = dict(envelope, payloadType=envelope["payloadType"].replace("json", "jsoN"))
    payload = bytearray(base64.b64decode(envelope["payload"]))
    payload[payload.index(b'"pass"') + 1] ^= 0x01  # "pass" -> "qass"
    changed_payload = dict(envelope, payload=base64.b64encode(bytes(payload)).decode())
    signature = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    signature[0] ^= 0x01
    changed_sig = dict(
        envelope,
        signatures=[dict(envelope["signatures"][0], sig=base64.b64encode(signature).decode())],
    )
    for changed in (changed_type, changed_payload, changed_sig):
        assert not _in_toto_verifies(changed, listing)


def test_unlearn_verify_refuses_every_changed_byte_of_the_envelope(issued):
    from core.service.attestation import verify
    from core.service.signing import VerificationError, load_public_keys

    certificate = issued["certificate"]
    keys = load_public_keys((issued["tmp"] / "keys.json").read_text())
    assert verify(certificate, keys).subjects == {issued["sha256"]: "job-1-adapter.tar"}
    for position in range(len(certificate)):
        changed = bytearray(certificate)
        changed[position] = (changed[position] + 1) % 256
        with pytest.raises(VerificationError):
            verify(bytes(changed), keys)


def _model_signing(directory: Path, public_key: Path) -> subprocess.CompletedProcess:
    """The OpenSSF `model_signing` command, as a user runs it on the unpacked archive."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "verify",
            "key",
            str(directory),
            "--signature",
            str(directory / "model.sig"),
            "--public_key",
            str(public_key),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_model_signing_verifies_the_unpacked_adapter_with_the_published_key(issued, tmp_path):
    listing = json.loads((issued["tmp"] / "keys.json").read_text())
    entry = next(k for k in listing["data"] if k["algorithm"] == "ECDSA-P256")
    public = tmp_path / "model-key.pem"
    public.write_text(entry["public_key_pem"])
    target = tmp_path / "unpacked"
    target.mkdir()
    subprocess.run(["tar", "-xf", str(issued["archive"]), "-C", str(target)], check=True)
    unpacked = next(target.rglob("model.sig")).parent
    ok = _model_signing(unpacked, public)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    weights = unpacked / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    assert _model_signing(unpacked, public).returncode != 0
    weights.write_bytes(original)
    bundle = json.loads((unpacked / "model.sig").read_text())
    payload = bytearray(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload[-3] ^= 0x01
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(bytes(payload)).decode()
    (unpacked / "model.sig").write_text(json.dumps(bundle))
    assert _model_signing(unpacked, public).returncode != 0


def test_unlearn_verify_checks_the_attestation_and_the_model_and_a_json_certificate(issued):
    from api.cli import app
    from core.service.signing import Keyring

    tmp = issued["tmp"]
    (tmp / "cert.json").write_bytes(issued["certificate"])
    keys = str(tmp / "keys.json")
    run = CliRunner().invoke(
        app,
        [
            "verify",
            str(tmp / "cert.json"),
            "--keys",
            keys,
            "--artifact",
            str(issued["archive"]),
            "--model-dir",
            str(issued["adapter"]),
        ],
    )
    assert run.exit_code == 0, run.output
    assert "in-toto attestation" in run.output and "every file as signed" in run.output
    weights = issued["adapter"] / "adapter_model.safetensors"
    weights.write_bytes(b"\x01" + weights.read_bytes()[1:])
    bad = CliRunner().invoke(
        app,
        ["verify", str(tmp / "cert.json"), "--keys", keys, "--model-dir", str(issued["adapter"])],
    )
    assert bad.exit_code == 1 and "model signature does not hold" in bad.output, bad.output
    # A JSON certificate (signature member, RFC 8785) still verifies, after a rotation.
    keyring: Keyring = issued["keyring"]
    legacy = keyring.sign(
        {
            "job": {"id": "job-0", "tenant": "t"},
            "verdict": "pass",
            "artifacts": {"adapter": {"sha256": "ab" * 32}},
        }
    )
    keyring.rotate()
    (tmp / "keys.json").write_text(_published(keyring))
    (tmp / "old.json").write_bytes(legacy)
    old = CliRunner().invoke(app, ["verify", str(tmp / "old.json"), "--keys", keys])
    assert old.exit_code == 0 and "JSON certificate" in old.output, old.output
    again = CliRunner().invoke(app, ["verify", str(tmp / "cert.json"), "--keys", keys])
    assert again.exit_code == 0, again.output  # the rotated-out key stays published
    (tmp / "old.json").write_bytes(legacy.replace(b'"pass"', b'"fail"'))
    old = CliRunner().invoke(app, ["verify", str(tmp / "old.json"), "--keys", keys])
    assert old.exit_code == 1 and "INVALID" in old.output


def test_a_job_without_eval_says_no_audit_ran():
    from core.service.certificates import audits

    assert audits({"method": "ga"}, {}) == [
        {"audit": "robustness", "status": "off", "reason": "the spec has no eval section"},
        {"audit": "privacy", "status": "off", "reason": "the spec has no eval section"},
    ]
