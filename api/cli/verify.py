"""`unlearn verify CERT`: a certificate checked offline, by anyone holding it and the
service's public keys; no database, no API key."""

# The import of core.service.signing is inside `verify`: `unlearn` with only the base
# install (the client) imports this module to list every command; the signature check
# needs cryptography, which comes with the api extra.

from __future__ import annotations

import json
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
    keys: str | None = typer.Option(
        None,
        help="The public keys: a file or URL of GET /v1/signing-keys JSON, or a PEM public "
        "key file. Default: UNLEARN_API_URL/v1/signing-keys.",
    ),
) -> None:
    """Check a certificate offline: canonical form, Ed25519 signature by a published key,
    and (given the artifact) that the downloaded file is the one certified. Exit 0: valid;
    1: INVALID (changed, or not signed by these keys); 2: could not check (no key source,
    or a file or URL that cannot be read)."""
    from core.service.signing import VerificationError, file_digest, load_public_keys
    from core.service.signing import verify as check

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
            text = httpx.get(source, timeout=30).raise_for_status().text
        else:
            text = Path(source).read_text()
        public = load_public_keys(text)
    except Exception as exc:  # a key source that cannot be read or parsed
        _cannot_check(f"cannot read the public keys from {source}: {exc}")
    try:
        data = certificate.read_bytes()
    except OSError as exc:
        _cannot_check(f"cannot read the certificate {certificate}: {exc.strerror}")
    try:
        content = check(data, public)
    except VerificationError as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(1) from None
    certified = {a["sha256"]: name for name, a in content.get("artifacts", {}).items()}
    for path in artifact:
        try:
            digest = file_digest(path)
        except OSError as exc:
            _cannot_check(f"cannot read the artifact {path}: {exc.strerror}")
        if digest not in certified:
            typer.echo(
                f"INVALID: {path} (sha256 {digest}) is not an artifact this certificate lists",
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(f"artifact {path}: the certified {certified[digest]!r} (sha256 {digest})")
    job = content.get("job", {})
    key_id = json.loads(data)["signature"].get("key_id")  # `check` returns the content alone
    typer.echo(
        f"valid: job {job.get('id')} of tenant {job.get('tenant')!r}, base model "
        f"{content.get('base_model', {}).get('name')!r}, verdict {content.get('verdict')}, "
        f"signed by key {key_id} (keys from {source})"
    )


def _cannot_check(message: str) -> NoReturn:
    """Exit 2: nothing was checked, so nothing can be said of the certificate."""
    typer.echo(f"error: {message}; the certificate was not checked", err=True)
    raise typer.Exit(2)
