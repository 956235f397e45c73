"""Signed unlearning certificates: Ed25519 over RFC 8785 canonical JSON.

A certificate is one JSON document: its content, and a `signature` member holding the
algorithm, the signing key's id and the signature of the canonical JSON of everything
else. It is issued in canonical form, so anyone can check it offline with the public
key alone (`unlearn verify`): the file must be exactly the canonical serialisation of
what it says (one changed byte fails), and the signature must hold.

Keys live in a keyring directory (SIGNING_KEYS_DIR): one PEM file per private key,
named by its key id, and `active` naming the one that signs. A new key is generated
when the directory has none (the embedded default's first start); rotating adds a key
and makes it active, and the old public keys stay published, so old certificates stay
verifiable. Key ids are `ed25519-` and the first 16 hex digits of the sha256 of the raw
public key.

Beside each Ed25519 key the keyring holds an ECDSA P-256 key that signs output model
directories with OpenSSF model signing (core.service.attestation), which takes only
NIST curves: `ecdsa-p256-` and 16 hex digits of the sha256 of the uncompressed point,
active as named in `active-model`, rotated with the Ed25519 key and published with it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"
MODEL_ALGORITHM = "ECDSA-P256"
MODEL_KEY_PREFIX = "ecdsa-p256-"


def canonical(document: Any) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) bytes of a JSON value."""
    return rfc8785.dumps(document)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519-" + hashlib.sha256(raw).hexdigest()[:16]


def model_key_id(public: ec.EllipticCurvePublicKey) -> str:
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return MODEL_KEY_PREFIX + hashlib.sha256(point).hexdigest()[:16]


def algorithm_of(kid: str) -> str:
    """The algorithm a published key id names."""
    return MODEL_ALGORITHM if kid.startswith(MODEL_KEY_PREFIX) else ALGORITHM


def _write_private(path: Path, private: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def public_pem(public: Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@dataclass
class Keyring:
    directory: Path

    def _private_files(self) -> list[Path]:
        return sorted(self.directory.glob("ed25519-*.pem")) if self.directory.is_dir() else []

    def ensure(self) -> str:
        """The active key id, generating a first key where there is none (and a model
        signing key beside a keyring that has none)."""
        if not self._private_files():
            return self.rotate()
        if not self._model_files():
            self._rotate_model_key()
        return self.active_id()

    def rotate(self) -> str:
        """A new key, made active, and a new model signing key; the old ones stay (their
        certificates and model signatures stay verifiable)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        private = Ed25519PrivateKey.generate()
        kid = key_id(private.public_key())
        _write_private(self.directory / f"{kid}.pem", private)
        (self.directory / "active").write_text(kid + "\n")
        self._rotate_model_key()
        return kid

    def _model_files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"{MODEL_KEY_PREFIX}*.pem"))

    def _rotate_model_key(self) -> str:
        private = ec.generate_private_key(ec.SECP256R1())
        kid = model_key_id(private.public_key())
        _write_private(self.directory / f"{kid}.pem", private)
        (self.directory / "active-model").write_text(kid + "\n")
        return kid

    def model_key(self) -> tuple[str, Path]:
        """The active model signing key: its id and its private key file (PEM, PKCS#8),
        which OpenSSF model signing reads."""
        self.ensure()
        marker = self.directory / "active-model"
        kid = marker.read_text().strip() if marker.is_file() else self._model_files()[-1].stem
        return kid, self.directory / f"{kid}.pem"

    def model_public_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        keys = {}
        for path in self._model_files():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path.stem}: not an ECDSA key")
            keys[path.stem] = key.public_key()
        return keys

    def active_id(self) -> str:
        marker = self.directory / "active"
        if marker.is_file():
            return marker.read_text().strip()
        files = self._private_files()
        if not files:
            raise FileNotFoundError(f"no signing key in {self.directory}")
        return files[-1].stem

    def private(self, kid: str) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key(
            (self.directory / f"{kid}.pem").read_bytes(), password=None
        )
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{kid}: not an Ed25519 key")
        return key

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {path.stem: self.private(path.stem).public_key() for path in self._private_files()}

    def sign(self, content: dict[str, Any]) -> bytes:
        """A JSON certificate (the format `verify` checks beside in-toto envelopes):
        canonical JSON bytes, `content` plus its signature member."""
        if "signature" in content:
            raise ValueError("the content has a member named signature already")
        kid = self.ensure()
        value = self.private(kid).sign(canonical(content))
        signature = {
            "algorithm": ALGORITHM,
            "key_id": kid,
            "value": base64.urlsafe_b64encode(value).decode().rstrip("="),
        }
        return canonical({**content, "signature": signature})


class VerificationError(Exception):
    pass


def verify(certificate: bytes, public_keys: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """The certificate's content when it is canonical, signed by one of `public_keys` and
    unaltered; VerificationError saying what failed otherwise."""
    try:
        document = json.loads(certificate)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("signature"), dict):
        raise VerificationError("no signature member")
    if canonical(document) != certificate.rstrip(b"\n"):
        raise VerificationError("not in canonical form (RFC 8785): the file was changed")
    signature = document.pop("signature")
    if signature.get("algorithm") != ALGORITHM:
        raise VerificationError(f"unknown signature algorithm {signature.get('algorithm')!r}")
    public = public_keys.get(signature.get("key_id", ""))
    if public is None:
        raise VerificationError(f"no public key for key id {signature.get('key_id')!r}")
    value = str(signature.get("value", ""))
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        # One signature has one encoding: a last character whose unused bits differ
        # decodes to the same bytes, and would let a changed file pass.
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != value:
            raise ValueError("not the signature's canonical encoding")
        public.verify(raw, canonical(document))
    except (InvalidSignature, ValueError):
        raise VerificationError("the signature does not match the content") from None
    return document


def load_public_keys(text: str) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 public keys from `GET /v1/signing-keys` JSON, or from one PEM public
    key."""
    return {kid: key for kid, key in _published(text).items() if isinstance(key, Ed25519PublicKey)}


def load_model_public_keys(text: str) -> dict[str, ec.EllipticCurvePublicKey]:
    """The ECDSA P-256 model signing keys from the same sources."""
    return {
        kid: key
        for kid, key in _published(text).items()
        if isinstance(key, ec.EllipticCurvePublicKey)
    }


def _published(text: str) -> dict[str, Ed25519PublicKey | ec.EllipticCurvePublicKey]:
    if text.lstrip().startswith("-----BEGIN"):
        key = _public_key(text)
        return {key_id(key) if isinstance(key, Ed25519PublicKey) else model_key_id(key): key}
    listing = json.loads(text)
    keys: dict[str, Ed25519PublicKey | ec.EllipticCurvePublicKey] = {}
    for entry in listing.get("data", listing if isinstance(listing, list) else []):
        key = _public_key(entry["public_key_pem"], entry.get("id"))
        derived = key_id(key) if isinstance(key, Ed25519PublicKey) else model_key_id(key)
        if derived != entry["id"]:
            raise ValueError(f"{entry['id']}: the key id does not match the key")
        keys[entry["id"]] = key
    return keys


def _public_key(pem: str, kid: str | None = None) -> Ed25519PublicKey | ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return key
    raise ValueError(f"{kid or 'the key'}: neither an Ed25519 nor an ECDSA P-256 public key")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(directory: Path) -> str:
    """A content digest of a model directory: the sha256 of the sorted lines `relative/path
    sha256-of-the-file`, one per file (weights, config, tokenizer)."""
    lines = sorted(
        f"{path.relative_to(directory).as_posix()} {file_digest(path)}"
        for path in directory.rglob("*")
        if path.is_file()
    )
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()
