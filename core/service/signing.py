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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"


def canonical(document: Any) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) bytes of a JSON value."""
    return rfc8785.dumps(document)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519-" + hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@dataclass
class Keyring:
    directory: Path

    def _private_files(self) -> list[Path]:
        return sorted(self.directory.glob("ed25519-*.pem")) if self.directory.is_dir() else []

    def ensure(self) -> str:
        """The active key id, generating a first key where there is none."""
        if not self._private_files():
            return self.rotate()
        return self.active_id()

    def rotate(self) -> str:
        """A new key, made active; the old ones stay (their certificates stay verifiable)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        private = Ed25519PrivateKey.generate()
        kid = key_id(private.public_key())
        path = self.directory / f"{kid}.pem"
        path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        (self.directory / "active").write_text(kid + "\n")
        return kid

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
        """The certificate, canonical JSON bytes: `content` plus its signature member."""
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
    """Public keys from `GET /v1/signing-keys` JSON, or from one PEM public key."""
    if text.lstrip().startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return {key_id(key): key}
    listing = json.loads(text)
    keys = {}
    for entry in listing.get("data", listing if isinstance(listing, list) else []):
        key = serialization.load_pem_public_key(entry["public_key_pem"].encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{entry.get('id')}: not an Ed25519 public key")
        if key_id(key) != entry["id"]:
            raise ValueError(f"{entry['id']}: the key id does not match the key")
        keys[entry["id"]] = key
    return keys


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
