"""The tenant's side of `unlearn`: `unlearn files ...` and `unlearn jobs ...`, over REST
with the Python client (api.client), configured by UNLEARN_API_URL and UNLEARN_API_KEY.
Nothing here touches the database, the queue or torch."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml
from tqdm import tqdm

from api.client import TERMINAL, APIError, ChecksumError, Client, Event, Job, problems_of

files_app = typer.Typer(
    help="Your files on the service (UNLEARN_API_URL, UNLEARN_API_KEY).", no_args_is_help=True
)
jobs_app = typer.Typer(
    help="Your jobs on the service (UNLEARN_API_URL, UNLEARN_API_KEY).", no_args_is_help=True
)

MetadataOption = typer.Option(
    [], "--metadata", "-m", metavar="KEY=VALUE", help="Repeatable: a metadata entry."
)


def _metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        out[key] = value
    return out


@contextmanager
def _client() -> Iterator[Client]:
    """A client from the environment; errors become one line and an exit status."""
    try:
        with Client() as client:
            yield client
    except ValueError as exc:  # no URL or key, or an invalid file in a spec
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except APIError as exc:
        request = f" (request {exc.request_id})" if exc.request_id else ""
        param = f" [{exc.param}]" if exc.param else ""
        typer.echo(f"error [{exc.code}]{param}: {exc.message}{request}", err=True)
        raise typer.Exit(1) from None
    except ChecksumError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        if isinstance(exc, httpx.TransportError):
            typer.echo(f"error: cannot reach the service: {exc}", err=True)
            raise typer.Exit(1) from None
        raise


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


# -- files ---------------------------------------------------------------------------


@files_app.command("upload")
def files_upload(
    paths: list[Path] = typer.Argument(..., exists=True, dir_okay=False, metavar="PATH..."),
    purpose: str = typer.Option(..., help="forget | retain | contrast | eval"),
    metadata: list[str] = MetadataOption,
) -> None:
    """Upload files and wait for their validation; prints each id, or each problem (line,
    field) of a file that is invalid (exit status 1)."""
    invalid = 0
    with _client() as client:
        for path in paths:
            file = client.upload_file(path, purpose, metadata=_metadata(metadata))
            if file["status"] == "valid":
                typer.echo(f"{file['id']}\t{path}\t{file['kind']}, {file['records']} records")
                continue
            invalid += 1
            typer.echo(f"{file['id']}\t{path}\tINVALID", err=True)
            for line in problems_of(file, path):
                typer.echo(f"  {line}", err=True)
    if invalid:
        raise typer.Exit(1)


@files_app.command("list")
def files_list(
    purpose: str | None = typer.Option(None),
    metadata: list[str] = MetadataOption,
    limit: int = typer.Option(20, min=1),
    as_json: bool = typer.Option(False, "--json", help="The API's objects, as JSON."),
) -> None:
    """Your files, newest first: id, status, purpose, records, name."""
    with _client() as client:
        files = list(client.list_files(purpose=purpose, metadata=_metadata(metadata), limit=limit))
    if as_json:
        _print_json(files)
        return
    for f in files:
        typer.echo(
            f"{f['id']}\t{f['status']}\t{f['purpose']}\t{f['records'] or '-'}\t{f['filename']}"
        )


@files_app.command("get")
def files_get(file_id: str) -> None:
    """One file with its validation report, as JSON."""
    with _client() as client:
        _print_json(client.get_file(file_id))


@files_app.command("delete")
def files_delete(file_id: str) -> None:
    """Delete a file's content (a file an active job uses cannot be deleted)."""
    with _client() as client:
        client.delete_file(file_id)
    typer.echo(f"deleted {file_id}")


# -- jobs ----------------------------------------------------------------------------


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{path}: not YAML or JSON: {exc}", param_hint="SPEC") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path}: a job spec is a mapping", param_hint="SPEC")
    return spec


@jobs_app.command("submit")
def jobs_submit(
    spec_path: Path = typer.Argument(..., exists=True, dir_okay=False, metavar="SPEC"),
    metadata: list[str] = MetadataOption,
    idempotency_key: str | None = typer.Option(
        None, help="Submitting again with the same key returns the same job (default: new)."
    ),
    wait: bool = typer.Option(False, help="Follow the job to its end (as `jobs wait`)."),
) -> None:
    """Submit a job spec (YAML or JSON, the body of POST /v1/jobs). File slots may name
    local files (relative to the spec): they are uploaded first. Prints the job id."""
    spec = _read_spec(spec_path)
    extra = _metadata(metadata)
    if extra:
        spec["metadata"] = {**(spec.get("metadata") or {}), **extra}
    with _client() as client:
        spec = client.upload_spec_files(spec, spec_path.parent, metadata=extra)
        job = client.submit_job(spec, idempotency_key=idempotency_key)
        typer.echo(f"submitted {job['id']} ({job['method']} on {job['base_model']})", err=True)
        typer.echo(job["id"])
        if wait:
            job = follow(client, job["id"], None)
    if wait:
        _exit_for(job)


@jobs_app.command("list")
def jobs_list(
    status: str | None = typer.Option(None, help="queued | running | evaluating | succeeded ..."),
    metadata: list[str] = MetadataOption,
    limit: int = typer.Option(20, min=1),
    as_json: bool = typer.Option(False, "--json", help="The API's objects, as JSON."),
) -> None:
    """Your jobs, newest first: id, status (with the verdict once succeeded), method, model,
    step, created."""
    with _client() as client:
        jobs = list(client.list_jobs(status=status, metadata=_metadata(metadata), limit=limit))
    if as_json:
        _print_json(jobs)
        return
    for j in jobs:
        typer.echo(job_line(j))


def job_line(job: Job) -> str:
    """One job of `jobs list`, tab-separated; a succeeded job's status carries its verdict
    (a succeeded job may fail its criteria)."""
    progress = job["progress"]
    steps = f"{progress['step']}/{progress['total_steps'] or '?'}"
    status = job["status"]
    if job.get("verdict"):
        status += f" (verdict {job.get('verdict')})"
    return "\t".join(
        (job["id"], status, job["method"], job["base_model"], steps, str(job["created_at"]))
    )


@jobs_app.command("get")
def jobs_get(job_id: str) -> None:
    """One job (status, progress, error, summary of metrics), as JSON."""
    with _client() as client:
        _print_json(client.get_job(job_id))


@jobs_app.command("metrics")
def jobs_metrics(job_id: str) -> None:
    """A finished job's metrics: before and after, evidence, criteria and verdict."""
    with _client() as client:
        _print_json(client.metrics(job_id))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Ask a queued or running job to stop (it ends as cancelled)."""
    with _client() as client:
        job = client.cancel_job(job_id)
    typer.echo(f"{job_id}: {job['status']}, cancel requested")


@jobs_app.command("wait")
def jobs_wait(
    job_id: str,
    timeout: float | None = typer.Option(None, help="Seconds; exit status 3 when it runs out."),
) -> None:
    """Follow a job live (its phases, steps and probes) to its end. Exit status 0 when it
    succeeded, 1 when it failed or was cancelled."""
    with _client() as client:
        job = follow(client, job_id, timeout)
    _exit_for(job)


@jobs_app.command("download")
def jobs_download(
    job_id: str,
    artifact: list[str] = typer.Option(
        [], "--artifact", "-a", help="adapter | model | report (repeatable; default: all)."
    ),
    out: Path = typer.Option(Path("."), help="Directory to put them in."),
    unpack: bool = typer.Option(True, help="Unpack each archive into OUT/NAME."),
) -> None:
    """Download a job's artifacts, checking each one's sha256; an interrupted download
    resumes where it stopped."""
    with _client() as client:
        names = artifact or [a["name"] for a in client.artifacts(job_id)]
        for name in names:
            path = client.download_artifact(job_id, name, out / job_id, unpack=unpack)
            typer.echo(f"{name}\t{path}")


def follow(client: Client, job_id: str, timeout: float | None) -> Any:
    """Follow a job's events to its end: steps as a progress bar, the other events as
    lines above it. Exit status 3 when `timeout` seconds run out first."""
    bar: Any = None

    def show(event: Event) -> None:
        nonlocal bar
        data = event["data"] or {}
        if event["type"] == "step" and data.get("total_steps"):
            if bar is None:
                bar = tqdm(
                    total=data["total_steps"], unit="step", desc="unlearning", file=sys.stderr
                )
            bar.set_postfix(loss=f"{data['loss']:.4f}", refresh=False)
            bar.update(max(0, data["step"] - bar.n))
        elif event["type"] != "step":
            (bar.write if bar is not None else lambda m: typer.echo(m, err=True))(
                f"[{event['type']}] {event['message']}"
            )

    try:
        job = client.wait(job_id, timeout=timeout, on_event=show)
    except TimeoutError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    finally:
        if bar is not None:
            bar.close()
    return job


def _exit_for(job: Any) -> None:
    assert job["status"] in TERMINAL
    if job["status"] == "succeeded":
        summary = job.get("metrics_summary") or {}
        verdict = f"; verdict {summary['verdict']}" if summary.get("verdict") else ""
        typer.echo(f"{job['id']} succeeded{verdict}", err=True)
        return
    error = job.get("error") or {}
    detail = f": [{error.get('code')}] {error.get('message')}" if error else ""
    typer.echo(f"{job['id']} {job['status']}{detail}", err=True)
    raise typer.Exit(1)
