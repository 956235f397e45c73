"""The operator's commands, on the service's database: migrate, keys, models, tenants,
the audit log and the signing keys."""

# The imports of core.service (and limits) are inside the commands: `unlearn` with only
# the base install (the client) imports this module to list every command; those
# packages come with the api extra, which the operator's commands need to run.

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from api.cli.service import load_settings, prepare_embedded, sessions
from core.errors import UnlearnError

if TYPE_CHECKING:
    from core.service.settings import Settings

keys_app = typer.Typer(
    help="API keys (stored hashed; the key is shown once).", no_args_is_help=True
)
models_app = typer.Typer(help="Base models tenants may name in jobs.", no_args_is_help=True)
tenants_app = typer.Typer(
    help="Per-tenant limits (defaults: MAX_ACTIVE_JOBS, MAX_STORED_BYTES, MAX_JOB_TOKENS, "
    "RATE_LIMIT).",
    no_args_is_help=True,
)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
signing_app = typer.Typer(help="The keys that sign certificates.", no_args_is_help=True)


def migrate(revision: str = typer.Argument("head")) -> None:
    """Apply the database migrations (production runs this as its own step)."""
    from core.service.migrate import upgrade

    settings = load_settings()
    settings.unlearn_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url, revision)
    typer.echo(f"database at {revision}")


# -- keys ----------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="The tenant the key acts for."),
    name: str | None = typer.Option(None, help="A label, e.g. the tool that uses it."),
) -> None:
    """Create an API key; the key is printed as the last line, once."""
    from core.service import audit, repo

    settings = load_settings()
    prepare_embedded(settings)
    try:
        with sessions(settings).begin() as session:
            row, plain = repo.create_key(session, tenant, name)
            audit.append(
                session,
                tenant,
                actor="operator",
                action="key.created",
                subject=row.id,
                data={"name": name},
            )
    except UnlearnError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"created key {row.id} for tenant {tenant!r}", err=True)
    typer.echo(plain)


@keys_app.command("list")
def keys_list(tenant: str | None = typer.Option(None)) -> None:
    """Keys (id, tenant, prefix, created, revoked); never the keys themselves."""
    from core.service import repo

    settings = load_settings()
    prepare_embedded(settings)
    with sessions(settings)() as session:
        for row in repo.list_keys(session, tenant):
            typer.echo(
                f"{row.id}\t{row.tenant}\t{row.prefix}...\t{row.created_at:%Y-%m-%d %H:%M}\t"
                f"{'revoked ' + f'{row.revoked_at:%Y-%m-%d %H:%M}' if row.revoked_at else 'active'}"
            )


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id (API processes stop accepting it within AUTH_CACHE_SECONDS)."""
    from core.service import audit, repo

    settings = load_settings()
    prepare_embedded(settings)
    try:
        with sessions(settings).begin() as session:
            row = repo.revoke_key(session, key_id)
            audit.append(
                session, row.tenant, actor="operator", action="key.revoked", subject=row.id
            )
            typer.echo(f"revoked {row.id} (tenant {row.tenant!r})")
    except UnlearnError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None


# -- models --------------------------------------------------------------------------


@models_app.command("add")
def models_add(
    name: str,
    uri: str = typer.Argument(..., metavar="PATH_OR_URI"),
    description: str | None = typer.Option(None),
    reference_for: str | None = typer.Option(
        None,
        help="This model was trained without the forget set of jobs on that base model: "
        "their evidence is reported beside its figures (eval.reference_model by default).",
    ),
    needs_gb: float | None = typer.Option(
        None,
        min=0,
        help="Device memory a job on it needs, in GB (with WORKER_CLASSES; default: "
        "estimated from its parameters and the job's adapter type).",
    ),
) -> None:
    """Register a base model directory (local path or s3://bucket/prefix) as NAME. Its
    content digest (sha256 over its files) is computed now, once, for certificates."""
    from core.service import audit, repo
    from core.service.capacity import parameter_count

    if not uri.startswith("s3://"):
        path = Path(uri).expanduser().resolve()
        if not (path / "config.json").is_file():
            typer.echo(
                f"error: {path} is not a Hugging Face model directory (no config.json)", err=True
            )
            raise typer.Exit(2)
        uri = str(path)
    settings = load_settings()
    prepare_embedded(settings)
    digest = _model_digest(settings, uri)
    parameters = None if uri.startswith("s3://") else parameter_count(Path(uri))
    try:
        with sessions(settings).begin() as session:
            if reference_for is not None:
                repo.get_model(session, reference_for)
            repo.add_model(
                session,
                name,
                uri,
                description,
                digest=digest,
                reference_for=reference_for,
                parameters=parameters,
                needs_gb=needs_gb,
            )
            audit.append(
                session,
                audit.OPERATOR,
                actor="operator",
                action="model.registered",
                subject=name,
                data={"digest": digest, "reference_for": reference_for},
            )
    except UnlearnError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    size = f", {parameters:,} parameters" if parameters else ""
    typer.echo(f"registered model {name!r} -> {uri} ({digest}{size})")


def _model_digest(settings: Settings, uri: str) -> str:
    """The content digest of a model directory: local, or an S3 prefix of the store."""
    from core.service.signing import directory_digest
    from core.service.storage import S3Store, make_store

    if not uri.startswith("s3://"):
        return directory_digest(Path(uri))
    store = make_store(settings)
    if not isinstance(store, S3Store):
        typer.echo(f"error: {uri} is on S3 but S3 is not configured (S3_BUCKET)", err=True)
        raise typer.Exit(2)
    return store.digest_prefix(uri)


@models_app.command("list")
def models_list() -> None:
    from core.service import repo

    settings = load_settings()
    prepare_embedded(settings)
    with sessions(settings)() as session:
        rows, _ = repo.list_models(session, limit=100, after=None)
        for row in rows:
            typer.echo(f"{row.name}\t{row.uri}")


# -- tenants -------------------------------------------------------------------------


@tenants_app.command("set")
def tenants_set(
    tenant: str,
    max_active_jobs: int | None = typer.Option(None, min=1, help="Queued or running jobs."),
    max_stored_bytes: int | None = typer.Option(None, min=0, help="Bytes of uploaded files."),
    max_job_tokens: int | None = typer.Option(None, min=1, help="Tokens one job may train on."),
    rate_limit: str | None = typer.Option(None, help="Requests, e.g. '50/second;2000/minute'."),
    reset: bool = typer.Option(False, help="Back to the defaults first."),
) -> None:
    """Override a tenant's limits (the options given; --reset clears the others)."""
    from limits import parse_many

    from core.service import audit, repo

    if rate_limit is not None:
        try:
            parse_many(rate_limit)
        except ValueError as exc:
            raise typer.BadParameter(f"{rate_limit!r} is not a rate limit: {exc}") from None
    settings = load_settings()
    prepare_embedded(settings)
    with sessions(settings).begin() as session:
        row = repo.lock_tenant(session, tenant)
        if reset:
            row.max_active_jobs = row.max_stored_bytes = row.max_job_tokens = None
            row.rate_limit = None
        for name, value in (
            ("max_active_jobs", max_active_jobs),
            ("max_stored_bytes", max_stored_bytes),
            ("max_job_tokens", max_job_tokens),
            ("rate_limit", rate_limit),
        ):
            if value is not None:
                setattr(row, name, value)
        audit.append(
            session,
            tenant,
            actor="operator",
            action="tenant.limits_set",
            subject=tenant,
            data={
                "max_active_jobs": row.max_active_jobs,
                "max_stored_bytes": row.max_stored_bytes,
                "max_job_tokens": row.max_job_tokens,
                "rate_limit": row.rate_limit,
            },
        )
    typer.echo(
        f"tenant {tenant!r} updated (API processes apply a new rate limit within "
        "AUTH_CACHE_SECONDS)"
    )


@tenants_app.command("list")
def tenants_list() -> None:
    """Tenants and their limits (the default where none is set)."""
    from core.service import repo
    from core.service.quotas import limits_for

    settings = load_settings()
    prepare_embedded(settings)
    with sessions(settings)() as session:
        for row in repo.list_tenants(session):
            limits = limits_for(settings, row)
            typer.echo(
                f"{row.id}	active jobs {limits.max_active_jobs}	stored bytes "
                f"{limits.max_stored_bytes}	job tokens {limits.max_job_tokens}	"
                f"rate {limits.rate_limit}"
            )


# -- the audit log and the signing keys ----------------------------------------------


@audit_app.command("verify")
def audit_verify(
    tenant: str | None = typer.Option(None, help="One tenant's chain (default: every chain)."),
    head: str | None = typer.Option(
        None,
        help="A hash the chain must contain, unaltered (with --tenant): one recorded "
        "earlier, e.g. a certificate's audit_head; entries after it are the log growing.",
    ),
) -> None:
    """Check the audit log's hash chains in the database: an edited, deleted or reordered
    entry fails, and so does a chain that does not contain --head. Exit 1: broken; 2: no
    such tenant."""
    from core.service import audit, repo

    if head is not None and tenant is None:
        raise typer.BadParameter("--head needs --tenant")
    settings = load_settings()
    prepare_embedded(settings)
    with sessions(settings)() as session:
        count, problems = audit.verify_all(session, tenant)
        if tenant is not None and count == 0 and repo.get_tenant(session, tenant) is None:
            typer.echo(f"error: no tenant {tenant!r} (`unlearn tenants list`)", err=True)
            raise typer.Exit(2)
        if head is not None and tenant is not None:
            entries = [audit.as_dict(e) for e in audit.entries_of(session, tenant)]
            problems += [p for p in audit.verify_chain(tenant, entries, head) if p.number is None]
    for problem in problems:
        typer.echo(f"BROKEN: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"audit log intact: {count} entries" + (f" of tenant {tenant!r}" if tenant else ""))


@signing_app.command("rotate")
def signing_rotate() -> None:
    """A new signing key, made active; old keys stay published so their certificates stay
    verifiable."""
    from core.service import certificates
    from core.service.signing import Keyring

    settings = load_settings()
    prepare_embedded(settings)
    keyring = Keyring(settings.keyring_dir)
    kid = keyring.rotate()
    with sessions(settings).begin() as session:
        certificates.publish(session, keyring)
    typer.echo(f"active signing key: {kid}")


@signing_app.command("list")
def signing_list() -> None:
    """The published public keys."""
    from core.service import certificates

    settings = load_settings()
    prepare_embedded(settings)
    with sessions(settings)() as session:
        for row in certificates.public_keys(session):
            typer.echo(f"{row.id}\t{row.created_at:%Y-%m-%d %H:%M}")
