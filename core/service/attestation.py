"""A job's certificate as an in-toto attestation, and its output model signed with
OpenSSF model signing, so supply-chain tools check both without this project's code.

The certificate is an in-toto Statement v1 (`STATEMENT_TYPE`) whose subjects are the
sha256 of each artifact archive and whose predicate, of type `PREDICATE_TYPE`, is the
unlearning record (core.service.certificates). It travels in a DSSE envelope
(securesystemslib), payload type `application/vnd.in-toto+json`, signed with the
keyring's active Ed25519 key; the signature's keyid is the published key id. The
payload is the statement's RFC 8785 canonical JSON and the envelope file is itself
canonical JSON, so `verify` refuses any changed byte of the file, where DSSE alone
covers the payload type and the payload.

An output model directory (an adapter, full weights) is signed in place with the
keyring's ECDSA P-256 key (`model_signing`): the signature, a Sigstore bundle, is the
file `model.sig` inside the directory, so it travels in the artifact archive and
`model_signing verify key DIR --signature DIR/model.sig --public_key KEY.pem` checks
the unpacked files.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from core.service.signing import (
    Keyring,
    VerificationError,
    canonical,
    public_pem,
)
from core.service.signing import verify as verify_json_certificate

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://unlearn-service.dev/unlearning-record/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
MODEL_SIGNATURE = "model.sig"


def statement(subjects: dict[str, str], predicate: dict[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 of `subjects` (name: sha256), checked with the in-toto
    attestation bindings (a subject needs a digest, the predicate a type and a body)."""
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import Statement

    subject = [
        {"name": name, "digest": {"sha256": digest}} for name, digest in sorted(subjects.items())
    ]
    descriptors = [ResourceDescriptor(name=s["name"], digest=s["digest"]).pb for s in subject]
    Statement(descriptors, PREDICATE_TYPE, json.loads(json.dumps(predicate))).validate()
    return {
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def sign_statement(keyring: Keyring, document: dict[str, Any]) -> bytes:
    """The DSSE envelope of `document`, signed with the active Ed25519 key: canonical
    JSON bytes."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner, SSlibKey

    kid = keyring.ensure()
    private = keyring.private(kid)
    public = SSlibKey.from_crypto(private.public_key(), keyid=kid, scheme="ed25519")
    envelope = Envelope(canonical(document), PAYLOAD_TYPE, {})
    envelope.sign(CryptoSigner(private, public))
    return canonical(envelope.to_dict())


@dataclass(frozen=True)
class Certified:
    """What a verified certificate says: its format (`in-toto` or `json`), the key that
    signed it, the record (the predicate, or a JSON certificate's content) and the
    certified artifacts by sha256."""

    format: str
    key_id: str
    record: dict[str, Any]
    subjects: dict[str, str]


def verify(data: bytes, public_keys: dict[str, Ed25519PublicKey]) -> Certified:
    """A certificate of either format checked against `public_keys`: a DSSE envelope
    (in-toto) or a JSON certificate with a signature member; VerificationError saying
    what failed otherwise."""
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or "payloadType" not in document:
        content = verify_json_certificate(data, public_keys)
        subjects = {a["sha256"]: name for name, a in content.get("artifacts", {}).items()}
        return Certified("json", document["signature"]["key_id"], content, subjects)
    if canonical(document) != data.rstrip(b"\n"):
        raise VerificationError("not in canonical form (RFC 8785): the file was changed")
    stated, kid = _open_envelope(document, public_keys)
    if stated.get("_type") != STATEMENT_TYPE or stated.get("predicateType") != PREDICATE_TYPE:
        raise VerificationError(
            f"not an unlearning record: _type {stated.get('_type')!r}, predicateType "
            f"{stated.get('predicateType')!r} (expected {STATEMENT_TYPE}, {PREDICATE_TYPE})"
        )
    subjects = {
        s["digest"]["sha256"]: s["name"]
        for s in stated.get("subject", [])
        if "sha256" in s["digest"]
    }
    return Certified("in-toto", kid, stated["predicate"], subjects)


def _open_envelope(
    document: dict[str, Any], public_keys: dict[str, Ed25519PublicKey]
) -> tuple[dict[str, Any], str]:
    """The envelope's statement and the key id that signed it, checked with
    securesystemslib's DSSE verification."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import FormatError
    from securesystemslib.exceptions import VerificationError as DsseError
    from securesystemslib.signer import Key, SSlibKey

    try:
        envelope = Envelope.from_dict(copy.deepcopy(document))
        # One payload and one signature have one encoding each (base64 that decodes to
        # the same bytes with other padding bits would let a changed file pass).
        if canonical(envelope.to_dict()) != canonical(document):
            raise ValueError("not the canonical base64 encoding")
    except (KeyError, TypeError, ValueError, FormatError) as exc:
        raise VerificationError(f"not a DSSE envelope: {exc}") from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise VerificationError(f"payloadType {envelope.payload_type!r}, not {PAYLOAD_TYPE}")
    unknown = [kid for kid in envelope.signatures if kid not in public_keys]
    if len(envelope.signatures) != 1 or unknown:
        raise VerificationError(f"no public key for key id {', '.join(unknown) or None!r}")
    keys: list[Key] = [
        SSlibKey.from_crypto(key, keyid=kid, scheme="ed25519") for kid, key in public_keys.items()
    ]
    try:
        accepted = envelope.verify(keys, 1)
    except DsseError:
        raise VerificationError("the signature does not match the content") from None
    try:
        stated = json.loads(envelope.payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"the payload is not JSON: {exc}") from None
    return stated, next(iter(accepted))


def sign_model(directory: Path, keyring: Keyring) -> str:
    """Sign the model directory in place (its `model.sig`); the key id that signed."""
    import model_signing

    kid, private_key = keyring.model_key()
    (
        model_signing.signing.Config()
        .use_elliptic_key_signer(private_key=private_key)
        .set_hashing_config(_hashing())
        .sign(directory, directory / MODEL_SIGNATURE)
    )
    return kid


def verify_model(directory: Path, public_keys: dict[str, ec.EllipticCurvePublicKey]) -> str:
    """The key id whose model signature (`model.sig`) matches every file of the
    directory; VerificationError naming what failed otherwise."""
    import model_signing

    signature = directory / MODEL_SIGNATURE
    if not signature.is_file():
        raise VerificationError(f"{directory} has no {MODEL_SIGNATURE}: not a signed model")
    if not public_keys:
        raise VerificationError("no model signing key (ECDSA P-256) among the public keys")
    failures = []
    with tempfile.TemporaryDirectory() as scratch:
        for kid, key in public_keys.items():
            pem = Path(scratch) / f"{kid}.pem"
            pem.write_text(public_pem(key))
            try:
                (
                    model_signing.verifying.Config()
                    .use_elliptic_key_verifier(public_key=pem)
                    .set_hashing_config(_hashing())
                    .verify(directory, signature)
                )
                return kid
            # model_signing raises ValueError for a changed file or another key, and
            # cryptography's InvalidSignature or a parse error for a changed signature.
            except Exception as exc:
                failures.append(f"{kid}: {exc}")
    raise VerificationError("the model signature does not hold: " + "; ".join(failures))


def _hashing() -> Any:
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(
        paths=[MODEL_SIGNATURE], ignore_git_paths=True
    )
