"""`unlearn verify CERT`: a certificate checked offline, by anyone holding it and the
service's public keys; no database, no API key."""

# The import of core.service.signing is inside `verify`: `unlearn` with only the base
# install (the client) imports this module to list every command; the signature check
# needs cryptography, which comes with the api extra.

from __future__ import annotations

import os
from pathlib import Path

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
    and (given the artifact) that the downloaded file is the one certified."""
    from core.service.signing import VerificationError, file_digest, load_public_keys
    from core.service.signing import verify as check

    source = keys or os.environ.get("UNLEARN_API_URL", "").rstrip("/") + "/v1/signing-keys"
    try:
        if source.startswith(("http://", "https://")):
            text = httpx.get(source, timeout=30).raise_for_status().text
        else:
            text = Path(source).read_text()
        public = load_public_keys(text)
        content = check(certificate.read_bytes(), public)
    except (OSError, ValueError, VerificationError) as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # a key source that cannot be read
        typer.echo(f"error: cannot read the public keys from {source}: {exc}", err=True)
        raise typer.Exit(2) from None
    certified = {a["sha256"]: name for name, a in content.get("artifacts", {}).items()}
    for path in artifact:
        digest = file_digest(path)
        if digest not in certified:
            typer.echo(
                f"INVALID: {path} (sha256 {digest}) is not an artifact this certificate lists",
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(f"artifact {path}: the certified {certified[digest]!r} (sha256 {digest})")
    job = content.get("job", {})
    typer.echo(
        f"valid: job {job.get('id')} of tenant {job.get('tenant')!r}, base model "
        f"{content.get('base_model', {}).get('name')!r}, verdict {content.get('verdict')}, "
        f"signed by {content.get('signature', {}).get('key_id', '?')}"
    )
