"""The `unlearn` command: the engine's commands (run, build-demo, from core.cli) plus
the service's: serve, worker, migrate, keys, models, and the demo over REST."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

from api.client import APIError, ChecksumError, Client
from api.tenant_cli import files_app, jobs_app
from api.tenant_cli import follow as follow_job
from core import cli as core_cli

app = core_cli.app
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
keys_app = typer.Typer(
    help="API keys (stored hashed; the key is shown once).", no_args_is_help=True
)
models_app = typer.Typer(help="Base models tenants may name in jobs.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
tenants_app = typer.Typer(
    help="Per-tenant limits (defaults: MAX_ACTIVE_JOBS, MAX_STORED_BYTES, MAX_JOB_TOKENS, "
    "RATE_LIMIT).",
    no_args_is_help=True,
)
app.add_typer(tenants_app, name="tenants")


def _settings():
    from core.service.settings import Settings

    return Settings()


def _sessions(settings):
    from core.service.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.db_url))


def _prepare_embedded(settings) -> None:
    """The embedded default keeps its state in one directory and migrates itself."""
    from core.service.migrate import upgrade

    settings.unlearn_data_dir.mkdir(parents=True, exist_ok=True)
    if settings.database_url is None:
        upgrade(settings.db_url)


@app.command()
def migrate(revision: str = typer.Argument("head")) -> None:
    """Apply the database migrations (production runs this as its own step)."""
    from core.service.migrate import upgrade

    settings = _settings()
    settings.unlearn_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url, revision)
    typer.echo(f"database at {revision}")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="The tenant the key acts for."),
    name: str | None = typer.Option(None, help="A label, e.g. the tool that uses it."),
) -> None:
    """Create an API key; the key is printed as the last line, once."""
    from core.service import repo

    settings = _settings()
    _prepare_embedded(settings)
    from core.errors import UnlearnError
    from core.service import audit

    try:
        with _sessions(settings).begin() as session:
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

    settings = _settings()
    _prepare_embedded(settings)
    with _sessions(settings)() as session:
        for row in repo.list_keys(session, tenant):
            typer.echo(
                f"{row.id}\t{row.tenant}\t{row.prefix}...\t{row.created_at:%Y-%m-%d %H:%M}\t"
                f"{'revoked ' + f'{row.revoked_at:%Y-%m-%d %H:%M}' if row.revoked_at else 'active'}"
            )


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id (API processes stop accepting it within AUTH_CACHE_SECONDS)."""
    from core.errors import UnlearnError
    from core.service import repo

    settings = _settings()
    _prepare_embedded(settings)
    try:
        from core.service import audit

        with _sessions(settings).begin() as session:
            row = repo.revoke_key(session, key_id)
            audit.append(
                session, row.tenant, actor="operator", action="key.revoked", subject=row.id
            )
            typer.echo(f"revoked {row.id} (tenant {row.tenant!r})")
    except UnlearnError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None


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
    from core.service.signing import directory_digest

    if not uri.startswith("s3://"):
        path = Path(uri).expanduser().resolve()
        if not (path / "config.json").is_file():
            typer.echo(
                f"error: {path} is not a Hugging Face model directory (no config.json)", err=True
            )
            raise typer.Exit(2)
        uri = str(path)
    settings = _settings()
    _prepare_embedded(settings)
    from core.errors import UnlearnError

    if uri.startswith("s3://"):
        from core.service.storage import S3Store, make_store

        store = make_store(settings)
        if not isinstance(store, S3Store):
            typer.echo(f"error: {uri} is on S3 but S3 is not configured (S3_BUCKET)", err=True)
            raise typer.Exit(2)
        digest = store.digest_prefix(uri)
    else:
        digest = directory_digest(Path(uri))
    from core.service.capacity import parameter_count

    parameters = None if uri.startswith("s3://") else parameter_count(Path(uri))
    try:
        with _sessions(settings).begin() as session:
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


@models_app.command("list")
def models_list() -> None:
    from core.service import repo

    settings = _settings()
    _prepare_embedded(settings)
    with _sessions(settings)() as session:
        rows, _ = repo.list_models(session, limit=100, after=None)
        for row in rows:
            typer.echo(f"{row.name}\t{row.uri}")


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

    from core.service import repo

    if rate_limit is not None:
        try:
            parse_many(rate_limit)
        except ValueError as exc:
            raise typer.BadParameter(f"{rate_limit!r} is not a rate limit: {exc}") from None
    settings = _settings()
    _prepare_embedded(settings)
    with _sessions(settings).begin() as session:
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
        from core.service import audit

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

    settings = _settings()
    _prepare_embedded(settings)
    with _sessions(settings)() as session:
        for row in repo.list_tenants(session):
            limits = limits_for(settings, row)
            typer.echo(
                f"{row.id}	active jobs {limits.max_active_jobs}	stored bytes "
                f"{limits.max_stored_bytes}	job tokens {limits.max_job_tokens}	"
                f"rate {limits.rate_limit}"
            )


audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
signing_app = typer.Typer(help="The keys that sign certificates.", no_args_is_help=True)
app.add_typer(signing_app, name="signing-keys")


@app.command()
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
            import httpx

            text = httpx.get(source, timeout=30).raise_for_status().text
        else:
            text = Path(source).read_text()
        public = load_public_keys(text)
        content = check(certificate.read_bytes(), public)
    except (OSError, ValueError, VerificationError) as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - a key source that cannot be read
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


@audit_app.command("verify")
def audit_verify(
    tenant: str | None = typer.Option(None, help="One tenant's chain (default: every chain)."),
    head: str | None = typer.Option(
        None,
        help="The hash the chain must end at (with --tenant): "
        "one recorded earlier, e.g. in a certificate's audit_head.",
    ),
) -> None:
    """Check the audit log's hash chains in the database: an edited, deleted or reordered
    entry fails, and so does a chain that does not end at --head."""
    from core.service import audit

    if head is not None and tenant is None:
        raise typer.BadParameter("--head needs --tenant")
    settings = _settings()
    _prepare_embedded(settings)
    with _sessions(settings)() as session:
        count, problems = audit.verify_all(session, tenant)
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

    settings = _settings()
    _prepare_embedded(settings)
    keyring = Keyring(settings.keyring_dir)
    kid = keyring.rotate()
    with _sessions(settings).begin() as session:
        certificates.publish(session, keyring)
    typer.echo(f"active signing key: {kid}")


@signing_app.command("list")
def signing_list() -> None:
    """The published public keys."""
    from core.service import certificates

    settings = _settings()
    _prepare_embedded(settings)
    with _sessions(settings)() as session:
        for row in certificates.public_keys(session):
            typer.echo(f"{row.id}\t{row.created_at:%Y-%m-%d %H:%M}")


def worker_command(settings, *, pool: str | None = None) -> list[str]:
    # Embedded: one solo process (no fork at all). Production: prefork with one child per
    # worker process, the model loaded in the child; one GPU per worker via CUDA_VISIBLE_DEVICES.
    pool = pool or ("solo" if settings.embedded else "prefork")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        "1",
        "-Q",
        settings.queue_for(settings.worker_class),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


_DEVICE_PROBE = """
import sys
from core.errors import UnlearnError
from core.engine.modeling import pick_device
try:
    pick_device(sys.argv[1])
except UnlearnError as exc:
    sys.exit(exc.message)
"""


def _check_worker_device(device: str | None) -> None:
    """Refuse to start a worker told to use a device that is not here (WORKER_DEVICE,
    --gpu): it would take every job from the queue and fail it. Probed in a subprocess:
    the worker's prefork parent, which this process becomes, must not import torch."""
    if not device:
        return  # auto: CUDA if present, else the CPU; always there
    probe = subprocess.run(
        [sys.executable, "-c", _DEVICE_PROBE, device], capture_output=True, text=True
    )
    if probe.returncode != 0:
        reason = (
            probe.stderr.strip().splitlines()[-1]
            if probe.stderr.strip()
            else f"exit {probe.returncode}"
        )
        typer.echo(f"error [device_unavailable]: {reason}; the worker did not start", err=True)
        raise typer.Exit(2)


@app.command()
def worker(
    pool: str | None = typer.Option(
        None, help="solo or prefork (default: prefork; solo embedded)."
    ),
    gpu: str | None = typer.Option(
        None,
        help="Pin this worker to one GPU (CUDA_VISIBLE_DEVICES); "
        "run one worker per GPU. Default: cuda if present, else cpu.",
    ),
    worker_class: str | None = typer.Option(
        None,
        "--class",
        help="The worker class this worker serves (one of WORKER_CLASSES): it takes the "
        "jobs routed to that class's queue.",
    ),
) -> None:
    """A Celery worker: takes job ids from the broker and runs them through core."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        os.environ["WORKER_DEVICE"] = "cuda"
    if worker_class is not None:
        os.environ["WORKER_CLASS"] = worker_class
    settings = _settings()
    classes = settings.worker_classes or {}
    if (settings.worker_class is not None) != bool(classes) or (
        classes and settings.worker_class not in classes
    ):
        typer.echo(
            f"error [worker_class]: --class {settings.worker_class!r} with WORKER_CLASSES "
            f"{sorted(classes) or 'unset'}: with classes, name one of them; without, none",
            err=True,
        )
        raise typer.Exit(2)
    _check_worker_device(settings.worker_device)
    if settings.embedded:
        _prepare_embedded(settings)
    command = worker_command(settings, pool=pool)
    os.execv(command[0], command)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    with_worker: bool = typer.Option(True, help="Also start a worker (the embedded default)."),
    workers: int = typer.Option(1, min=1, help="API processes (the production stack)."),
) -> None:
    """The API plus a worker. Embedded (SQLite, local store, a server-less queue) when
    DATABASE_URL / BROKER_URL are not set; state under UNLEARN_DATA_DIR."""
    from api import server
    from core.service import logs

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    if with_worker and settings.worker_classes:
        typer.echo(
            "error [worker_class]: with WORKER_CLASSES, jobs go to each class's queue: start "
            "the API with --no-with-worker and one `unlearn worker --class NAME` per class",
            err=True,
        )
        raise typer.Exit(2)
    if with_worker:
        _check_worker_device(settings.worker_device)
    _prepare_embedded(settings)
    worker_process = None
    if with_worker:
        env = {
            **os.environ,
            "UNLEARN_DATA_DIR": str(settings.unlearn_data_dir),
            "WORKER_THREADS": str(embedded_worker_threads(settings.worker_threads)),
        }
        worker_process = subprocess.Popen(
            worker_command(settings), env=env, preexec_fn=_die_with_parent
        )
    # uvicorn shuts down on SIGTERM, then raises the signal again; with the default
    # handler that ends this process before `finally` could stop the worker.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    mode = "embedded (SQLite, local store)" if settings.embedded else "configured services"
    typer.echo(
        f"serving on http://{host}:{port} ({mode}); data in {settings.unlearn_data_dir}", err=True
    )
    try:
        server.run(settings, host=host, port=port, workers=workers)
    finally:
        if worker_process is not None:
            worker_process.send_signal(signal.SIGTERM)
            try:
                worker_process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker_process.kill()


def embedded_worker_threads(configured: int) -> int:
    """Torch threads of the worker `unlearn serve` starts beside the API: WORKER_THREADS
    where set, else every core this process may use but one, left to the API. A training
    job on every core loses far more than a core's share whenever the API answers: each
    parallel region waits for the thread the API's work descheduled (docs/performance.md,
    "Dashboards polling a job that trains")."""
    if configured:
        return configured
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _die_with_parent() -> None:
    """In a child of `unlearn serve` (Linux): SIGTERM when serve dies, even by SIGKILL, so
    no worker is left polling the broker on its own."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


# --- the demo, over REST ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(client: Any, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not become ready in time")


def run_demo_over_rest(
    client: Client,
    demo_dir: Path,
    out_dir: Path,
    *,
    steps: int,
    model_name: str = "demo-llama",
) -> dict[str, Any]:
    """With the Python client, as a tenant would: upload the demo's files, submit the
    CATNIP job, follow it live with a progress bar, download and check the artifacts.
    Returns the job, its metrics and what was saved."""
    from core.demo.build import demo_spec

    local = demo_spec(demo_dir, max_steps=steps)
    request = client.upload_spec_files({**local, "base_model": model_name})
    if "reference_model" in request.get("eval", {}):  # registered by the demo beside its model
        request["eval"]["reference_model"] = f"{model_name}-reference"
    typer.echo(f"[demo] uploaded the demo's files; submitting a {request['method']} job", err=True)
    job = client.submit_job(request)
    job = follow_job(client, job["id"], None)
    if job["status"] != "succeeded":
        error = job["error"] or {"code": None, "message": None}
        raise RuntimeError(f"job {job['id']} {job['status']}: {error['code']}: {error['message']}")
    saved = {
        a["name"]: client.download_artifact(job["id"], a["name"], out_dir)
        for a in client.artifacts(job["id"])
    }
    return {"job": job, "metrics": client.metrics(job["id"]), "artifacts": saved}


@app.command()
def demo(
    steps: int = typer.Option(
        60, help="Unlearning steps (upper bound; the stop rule may end sooner)."
    ),
    port: int = typer.Option(0, help="Port for the embedded service (0: any free port)."),
) -> None:
    """The main job end to end: the embedded service comes up, the demo forget set is
    uploaded, a CATNIP job is submitted over REST and polled, the result is downloaded."""
    from core.service import repo

    core_cli._quiet_libraries()
    started = time.monotonic()
    settings = _settings()
    if not settings.embedded:
        typer.echo(
            "[demo] DATABASE_URL/BROKER_URL are set: the demo runs on the embedded default "
            "only; unset them",
            err=True,
        )
        raise typer.Exit(2)
    demo_dir = settings.unlearn_data_dir / "demo"
    typer.echo(f"[demo model] {demo_dir} (built once, about 2 minutes on 2 CPU cores)", err=True)
    from core.demo.build import ensure_model

    events = core_cli.ConsoleEvents()
    info = ensure_model(demo_dir, events=events, reference=True)
    events.close()
    typer.echo(
        f"[demo model] {info['parameters']:,} parameters, {info['facts']} facts, "
        f"answers {info['accuracy']}",
        err=True,
    )
    _prepare_embedded(settings)
    with _sessions(settings).begin() as session:
        from core.service.signing import directory_digest

        repo.add_model(
            session,
            "demo-llama",
            str(demo_dir / "model"),
            "The built-in demo model",
            digest=directory_digest(demo_dir / "model"),
        )
        repo.add_model(
            session,
            "demo-llama-reference",
            str(demo_dir / "reference"),
            "The demo model's recipe without the dragons: never saw the forget set",
            digest=directory_digest(demo_dir / "reference"),
            reference_for="demo-llama",
        )
        _, key = repo.create_key(session, "demo", "unlearn demo")

    port = port or _free_port()
    env = {**os.environ, "UNLEARN_DATA_DIR": str(settings.unlearn_data_dir)}
    log_path = settings.unlearn_data_dir / "serve.log"
    log_file = log_path.open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        with Client(f"http://127.0.0.1:{port}", key, retries=2) as client:
            _wait_ready(client.http, server)
            typer.echo(
                f"[demo] service up on http://127.0.0.1:{port} (embedded; its log: {log_path})",
                err=True,
            )
            result = run_demo_over_rest(
                client, demo_dir, settings.unlearn_data_dir / "demo-output", steps=steps
            )
    except (APIError, ChecksumError, ValueError, RuntimeError) as exc:
        typer.echo(f"[demo] error: {exc} (the service log: {log_path})", err=True)
        raise typer.Exit(1) from None
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()
    core_cli._print_table(result["metrics"])
    stop = result["metrics"].get("stop_rule") or {}
    if stop:
        typer.echo(
            f"stop rule: {stop.get('reason') or 'ran all steps'}; kept the state of step "
            f"{stop.get('best', {}).get('step')}"
        )
    for name, path in result["artifacts"].items():
        typer.echo(f"{name}: {path}")
    typer.echo(
        f"job {result['job']['id']} succeeded; end to end {time.monotonic() - started:.0f} s"
    )
    (settings.unlearn_data_dir / "demo-output" / "metrics.json").write_text(
        json.dumps(result["metrics"], indent=2)
    )


def main() -> None:  # pragma: no cover
    app()
