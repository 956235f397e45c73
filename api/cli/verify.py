"""`unlearn verify CERT`: a certificate (an in-toto attestation in a DSSE envelope, or a
JSON certificate) and an unpacked model's signature checked offline, by anyone holding
them and the service's public keys; no database, no API key."""

# The imports of core.service.signing and core.service.attestation are inside `verify`:
# `unlearn` with only the base install (the client) imports this module to list every
# command; the checks need cryptography, securesystemslib and model-signing, which come
# with the api extra.

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import httpx
import typer


def verify(
    certificate: Path = typer.Argument(..., metavar="CERT", help="A certificate (JSON) to check."),
    artifact: list[Path] = typer.Option(
        [],
        help="A downloaded artifact archive (.tar.gz or .tar): its sha256 must be one the "
        "certificate lists. Repeatable.",
    ),
    model_dir: list[Path] = typer.Option(
        [],
        help="An unpacked adapter or model archive: its model.sig (OpenSSF model signing) "
        "must hold for every file with a published model signing key. Repeatable.",
    ),
    keys: str | None = typer.Option(
        None,
        help="The public keys: a file or URL of GET /v1/signing-keys JSON, or a PEM public "
        "key file. Default: UNLEARN_API_URL/v1/signing-keys.",
    ),
) -> None:
    """Check a certificate offline: the DSSE envelope of its in-toto statement (or a JSON
    certificate) in canonical form, its Ed25519 signature by a published key, (given the
    artifact) that the downloaded file is one certified and (given an unpacked model
    directory) its model signature. Exit 0: valid; 1: INVALID (changed, or not signed by
    these keys); 2: could not check (no key source, or a file or URL that cannot be read)."""
    from core.service.attestation import verify as check
    from core.service.attestation import verify_model
    from core.service.signing import (
        VerificationError,
        file_digest,
        load_model_public_keys,
        load_public_keys,
    )

    source, text = _key_source(keys)
    try:
        public, model_keys = load_public_keys(text), load_model_public_keys(text)
    except Exception as exc:  # a key source that cannot be parsed
        _cannot_check(f"cannot read the public keys from {source}: {exc}")
    try:
        data = certificate.read_bytes()
    except OSError as exc:
        _cannot_check(f"cannot read the certificate {certificate}: {exc.strerror}")
    try:
        certified = check(data, public)
        signers = {path: verify_model(path, model_keys) for path in model_dir if path.is_dir()}
    except VerificationError as exc:
        _invalid(str(exc))
    for path in artifact:
        try:
            digest = file_digest(path)
        except OSError as exc:
            _cannot_check(f"cannot read the artifact {path}: {exc.strerror}")
        if digest not in certified.subjects:
            _invalid(f"{path} (sha256 {digest}) is not an artifact this certificate lists")
        typer.echo(
            f"artifact {path}: the certified {certified.subjects[digest]!r} (sha256 {digest})"
        )
    named = (certified.record.get("model_signature") or {}).get("key_id")
    for path in model_dir:
        if path not in signers:
            _cannot_check(f"{path} is not a directory (unpack the archive first)")
        if named is not None and signers[path] != named:
            _invalid(f"{path} is signed by {signers[path]}, the certificate names {named}")
        typer.echo(f"model {path}: every file as signed (model.sig, key {signers[path]})")
    record = certified.record
    job = record.get("job", {})
    typer.echo(
        f"valid: job {job.get('id')} of tenant {job.get('tenant')!r}, base model "
        f"{record.get('base_model', {}).get('name')!r}, verdict {record.get('verdict')}, "
        f"{'in-toto attestation' if certified.format == 'in-toto' else 'JSON certificate'} "
        f"signed by key {certified.key_id} (keys from {source})"
    )


def _key_source(keys: str | None) -> tuple[str, str]:
    """Where the public keys come from, and their text."""
    source = keys or os.environ.get("UNLEARN_API_URL", "").rstrip("/")
    if not source:
        _cannot_check(
            "no public keys to check against: pass --keys (a file or URL of "
            "GET /v1/signing-keys, or a PEM public key) or set UNLEARN_API_URL"
        )
    if keys is None:
        source += "/v1/signing-keys"
    try:
        if source.startswith(("http://", "https://")):
            return source, httpx.get(source, timeout=30).raise_for_status().text
        return source, Path(source).read_text()
    except Exception as exc:  # a key source that cannot be read
        _cannot_check(f"cannot read the public keys from {source}: {exc}")


def _invalid(message: str) -> NoReturn:
    """Exit 1: checked, and it does not hold."""
    typer.echo(f"INVALID: {message}", err=True)
    raise typer.Exit(1)


def _cannot_check(message: str) -> NoReturn:
    """Exit 2: nothing was checked, so nothing can be said of the certificate."""
    typer.echo(f"error: {message}; the certificate was not checked", err=True)
    raise typer.Exit(2)
