"""Run one job of the service: take the lease, fetch inputs, run the pipeline, store the
artifacts, record the outcome. The Celery task is a thin wrapper around `JobRunner.run`.

The job row is the truth. A delivery that finds the job finished returns; one that finds
a live lease (another worker is on it) backs off. The heartbeat renews the lease while
the job runs; if it stops (the worker was killed) the lease expires, a reaper re-sends
the job id, and the next worker resumes from the job's last checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tarfile
import threading
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from core.engine.events import Phase
from core.engine.spec_parts import EVAL_FILE_FIELDS, spec_file_ids
from core.errors import JobCancelled, UnlearnError
from core.service import audit, certificates, logs, repo
from core.service.db import Artifact
from core.service.enums import TERMINAL_STATUSES, ArtifactKind, EventType, JobStatus
from core.service.quotas import limits_for
from core.service.settings import Settings
from core.service.signing import Keyring
from core.service.storage import S3Store, Store, archive_suffix, file_sha256, make_archive
from worker.progress import DatabaseEvents, checkpoint_key

log = logging.getLogger(__name__)

ARTIFACT_KINDS = {
    "adapter": ArtifactKind.PEFT_ADAPTER,
    "model": ArtifactKind.HF_MODEL,
    "report": ArtifactKind.REPORT,
}


class LeaseLost(Exception):
    """Another worker took the job over (our heartbeat could not renew the lease)."""


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat(threading.Thread):
    """Renews the job's lease every heartbeat_seconds; notices when it is lost."""

    def __init__(self, sessions: sessionmaker, job_id: str, owner: str, settings: Settings):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.sessions, self.job_id, self.owner, self.settings = sessions, job_id, owner, settings
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_seconds):
            try:
                with self.sessions.begin() as session:
                    if not repo.renew_lease(
                        session, self.job_id, self.owner, self.settings.lease_seconds
                    ):
                        self.lost = True
                        log.warning("job %s: lease lost to another worker", self.job_id)
                        return
            except Exception:  # a DB blip: try again next beat; the lease has slack
                log.exception("job %s: heartbeat failed", self.job_id)

    def stop(self) -> None:
        self.stopped.set()


class JobRunner:
    def __init__(
        self, settings: Settings, sessions: sessionmaker, store: Store, owner: str | None = None
    ):
        self.settings, self.sessions, self.store = settings, sessions, store
        self.owner = owner or worker_identity()
        self._models: Any = None

    def _model_cache(self) -> Any:
        """The warm cache of base models this process keeps between jobs (created in the
        process that runs jobs: it holds torch tensors)."""
        if self._models is None:
            from core.engine.model_cache import ModelCache

            self._models = ModelCache(self.settings.model_cache_bytes)
        return self._models

    def run(self, job_id: str) -> str:
        """Run the job if this worker can take it. Returns what happened, for logs."""
        with logs.bound(job_id=job_id):
            return self._run(job_id)

    def _run(self, job_id: str) -> str:
        with self.sessions.begin() as session:
            acquired = repo.acquire_lease(session, job_id, self.owner, self.settings.lease_seconds)
        if not acquired:
            return self._not_acquired(job_id)
        heartbeat = Heartbeat(self.sessions, job_id, self.owner, self.settings)
        heartbeat.start()
        try:
            with self.sessions.begin() as session:
                job = repo.get_job(session, None, job_id)
                logs.bind(tenant=job.tenant)
                repo.add_event(
                    session,
                    job_id,
                    EventType.STATUS,
                    f"job running (attempt {job.attempts})",
                    {
                        "status": JobStatus.RUNNING,
                        "attempt": job.attempts,
                        "worker": self.owner,
                        "worker_class": self.settings.worker_class,
                    },
                )
                audit.append(
                    session,
                    job.tenant,
                    actor="worker",
                    action="job.running",
                    subject=job_id,
                    data={"attempt": job.attempts},
                )
            log.info("job %s: running (attempt %s) on %s", job_id, job.attempts, self.owner)
            outcome = self._execute(job_id, heartbeat)
        finally:
            heartbeat.stop()
        return outcome

    def _not_acquired(self, job_id: str) -> str:
        with self.sessions.begin() as session:
            job = repo.find_job(session, job_id)
            if job is None:
                return "no such job"
            if job.status in TERMINAL_STATUSES:
                return f"already {job.status}"
            if job.cancel_requested and (job.lease_owner is None or job.status == JobStatus.QUEUED):
                repo.finish_job(session, job, JobStatus.CANCELLED)
                return "cancelled before it started"
            return f"leased by {job.lease_owner} until {job.lease_expires_at}; backing off"

    def _execute(self, job_id: str, heartbeat: Heartbeat) -> str:
        from core.engine.pipeline import run_job  # torch is imported here, in the worker child only

        work = self.settings.work_dir / "jobs" / job_id
        try:
            spec, shown, chain = self._local_spec(job_id, work / "inputs")
            self._restore_checkpoint(job_id, work / "checkpoints")
            events = DatabaseEvents(
                self.sessions, job_id, self.settings, lambda: heartbeat.lost, self.store
            )
            with self.sessions() as session:
                tenant = repo.get_job(session, None, job_id).tenant
                limits = limits_for(self.settings, repo.get_tenant(session, tenant))
            result = run_job(
                spec,
                work / "output",
                models=self._model_cache(),
                events=events,
                device=self.settings.worker_device,
                checkpoint_dir=work / "checkpoints",
                shown=shown,
                max_tokens=limits.max_job_tokens,
                chain=chain,
            )
            events.phase(Phase.UPLOADING)
            self._store_artifacts(job_id, result.artifacts, work / "archives")
            with self.sessions.begin() as session:
                job = repo.get_job(session, None, job_id)
                if job.lease_owner != self.owner:
                    raise LeaseLost
                job.metrics = _json_safe(result.metrics)
                repo.finish_job(session, job, JobStatus.SUCCEEDED)
                audit.append(
                    session,
                    job.tenant,
                    actor="worker",
                    action="job.succeeded",
                    subject=job_id,
                    data={"verdict": job.metrics.get("verdict")},
                )
                certificates.issue(session, job, Keyring(self.settings.keyring_dir))
            shutil.rmtree(work, ignore_errors=True)
            self.store.delete(checkpoint_key(job_id))
            return "succeeded"
        except LeaseLost:
            return "lease lost; the other worker continues"
        except JobCancelled as exc:
            if heartbeat.lost:
                return "lease lost; the other worker continues"
            self._fail(job_id, JobStatus.CANCELLED, None, str(exc.message))
            shutil.rmtree(work, ignore_errors=True)
            return "cancelled"
        except UnlearnError as exc:
            self._fail(job_id, JobStatus.FAILED, exc.code, exc.message)
            return f"failed: {exc.code}"
        except Exception as exc:  # noqa: BLE001 - the job must end failed, never stuck running
            log.exception("job %s failed", job_id)
            code, message = _unexpected(exc)
            self._fail(job_id, JobStatus.FAILED, code, message)
            return f"failed: {code}"

    def _redact(self, message: str) -> str:
        """Tenants name models, they do not see the operator's paths: a path under the
        job's model or inputs is named by what the tenant knows (model 'name', <inputs>),
        one under the work directory is <work>, any other absolute path (the store, a
        cache, a library's) is <path>."""
        known = {**getattr(self, "_redactions", {}), str(self.settings.work_dir): "<work>"}
        prefixes = sorted(known.items(), key=lambda item: -len(item[0]))

        def one(match: re.Match[str]) -> str:
            path = match.group(0)
            for secret, shown in prefixes:
                if path == secret or path.startswith(secret.rstrip("/") + "/"):
                    return shown + path[len(secret) :]
            return "<path>"

        return _ABSOLUTE_PATH.sub(one, message)

    def _fail(self, job_id: str, status: str, code: str | None, message: str | None) -> None:
        """End the job (if this worker still holds it) with a message fit for its tenant."""
        message = self._redact(message)[:2000] if message else message
        with self.sessions.begin() as session:
            job = repo.get_job(session, None, job_id)
            if job.lease_owner == self.owner:
                repo.finish_job(session, job, status, error_code=code, error_message=message)
                audit.append(
                    session,
                    job.tenant,
                    actor="worker",
                    action=f"job.{status}",
                    subject=job_id,
                    data={"error_code": code} if code else {},
                )

    def _restore_checkpoint(self, job_id: str, directory: Path) -> None:
        """A job taken over on another host (its local checkpoints are not here) gets the
        last checkpoint its previous worker copied to the store."""
        from core.engine.checkpoint import latest_checkpoint

        if latest_checkpoint(directory) is not None or not self.settings.checkpoints_to_store:
            return
        if not self.store.exists(checkpoint_key(job_id)):
            return
        directory.mkdir(parents=True, exist_ok=True)
        archive = directory / ".restore.tar"
        self.store.get(checkpoint_key(job_id), archive)
        with tarfile.open(archive) as tar:
            tar.extractall(directory, filter="data")
        archive.unlink()
        log.info("job %s: restored its checkpoint from the store", job_id)

    # --- inputs ---------------------------------------------------------------

    def _local_spec(
        self, job_id: str, inputs: Path
    ) -> tuple[Any, dict[str, str], list[dict[str, Any]] | None]:
        """The job's spec with file ids replaced by local copies, the model name by a
        local directory and init_from_job by the previous job's output; how the report
        names the model and the forget file for the tenant (the model's name; the file's
        id and name), not by those paths; the chain of jobs before it, by job id."""
        from core.engine.spec import parse_spec

        with self.sessions() as session:
            job = repo.get_job(session, None, job_id)
            raw = dict(job.spec)
            model = repo.get_model(session, job.base_model)
            files = repo.files_by_id(session, job.tenant, spec_file_ids(raw))
        inputs.mkdir(parents=True, exist_ok=True)

        def fetch(file_id: str | None) -> str | None:
            if file_id is None:
                return None
            row = files.get(file_id)
            if row is None:
                raise UnlearnError(
                    f"file {file_id} was deleted after the job was created",
                    code="file_not_found",
                    param="forget_file",
                )
            target = inputs / f"{row.id}{Path(row.filename).suffix.lower() or '.jsonl'}"
            if not target.is_file() or file_sha256(target) != row.sha256:
                self.store.get(row.storage_key, target)
            return str(target)

        raw["base_model"] = str(self._model_dir(model.uri))
        self._redactions = {raw["base_model"]: f"model '{model.name}'", str(inputs): "<inputs>"}
        reference_name = (raw.get("eval") or {}).get("reference_model")
        if reference_name:
            with self.sessions() as session:
                reference = repo.get_model(session, reference_name)
            local = str(self._model_dir(reference.uri))
            raw["eval"] = {**raw["eval"], "reference_model": local}
            self._redactions[local] = f"model '{reference.name}'"
        forget = files.get(raw["forget_file"])
        shown = {
            "job": job_id,
            "base_model": model.name,
            "forget_file": f"{raw['forget_file']} ({forget.filename})"
            if forget
            else raw["forget_file"],
        }
        if model.digest:
            shown["base_model_digest"] = model.digest
        chain = None
        if raw.get("init_from_job"):
            start_dir, chain = self._fetch_start(job_id, inputs / "start")
            self._redactions[str(start_dir)] = f"job {raw['init_from_job']}'s output"
            raw["init_from_job"] = str(start_dir)
        raw["forget_file"] = fetch(raw["forget_file"])
        raw["retain_file"] = fetch(raw.get("retain_file"))
        raw["contrast_file"] = fetch(raw.get("contrast_file"))
        if raw.get("eval"):
            raw["eval"] = {
                k: (fetch(v) if k in EVAL_FILE_FIELDS else v) for k, v in raw["eval"].items()
            }
        return parse_spec(raw), shown, chain

    def _fetch_start(self, job_id: str, directory: Path) -> tuple[Path, list[dict[str, Any]]]:
        """The output of the job this one starts from, from the store into `directory` as
        the engine reads it (adapter/ after a LoRA job, else model/), its archive checked
        against the sha256 recorded when it was stored; and the chain, first job first."""
        with self.sessions() as session:
            job = repo.get_job(session, None, job_id)
            ids = list(job.chain or [])
            rows = repo.jobs_by_id(session, job.tenant, ids)
            artifacts = {a.name: a for a in repo.list_artifacts(session, ids[-1])}
        name = "adapter" if "adapter" in artifacts else "model"
        if name not in artifacts:
            raise UnlearnError(
                f"init_from_job: job {ids[-1]} has neither an adapter nor a model artifact",
                code="artifact_not_found",
                param="init_from_job",
            )

        def output(i: str) -> str:  # what the engine started from after job i
            if i == ids[-1]:
                return name
            spec = rows[i].spec if i in rows else {}
            return "adapter" if (spec.get("adapter") or {}).get("type") == "lora" else "model"

        artifact = artifacts[name]
        chain = [
            {"job": i, "method": rows[i].method if i in rows else None, "output": output(i)}
            for i in ids
        ]
        chain[-1]["sha256"] = artifact.sha256  # checked below: names the start for resumes
        target = directory / name
        if (directory / ".complete").is_file():
            return directory, chain  # fetched by an earlier attempt of this job
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        archive = directory / artifact.filename  # tar or tar.gz: tarfile tells them apart
        self.store.get(artifact.storage_key, archive)
        if file_sha256(archive) != artifact.sha256:
            raise UnlearnError(
                f"init_from_job: the {name} of job {ids[-1]} in the store does not match the "
                "sha256 recorded when it was stored; the operator should check the store",
                code="artifact_corrupt",
                param="init_from_job",
            )
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
        (directory / ".complete").write_text(artifact.sha256)
        return directory, chain

    def _model_dir(self, uri: str) -> Path:
        if not uri.startswith("s3://"):
            return Path(uri)
        cache = self.settings.work_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        if (cache / ".complete").is_file():
            return cache
        if not isinstance(self.store, S3Store):
            raise UnlearnError(
                f"model {uri} is on S3 but S3 is not configured (S3_BUCKET)",
                code="model_unavailable",
            )
        partial = cache.with_name(cache.name + f".part-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        self.store.download_prefix(uri, partial)
        (partial / ".complete").touch()
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
        return cache

    # --- outputs --------------------------------------------------------------

    def _store_artifacts(self, job_id: str, artifacts: dict[str, Path], archives: Path) -> None:
        archives.mkdir(parents=True, exist_ok=True)
        rows = []
        for name, directory in artifacts.items():
            suffix = archive_suffix(directory, self.settings.archive_gzip_max_bytes)
            archive = archives / f"{name}.{suffix}"
            sha256 = make_archive(directory, archive)
            key = f"jobs/{job_id}/{name}.{suffix}"
            self.store.put(key, archive)
            rows.append(
                Artifact(
                    job_id=job_id,
                    name=name,
                    kind=ARTIFACT_KINDS.get(name, name),
                    filename=f"{job_id}-{name}.{suffix}",
                    bytes=archive.stat().st_size,
                    sha256=sha256,
                    storage_key=key,
                )
            )
        with self.sessions.begin() as session:
            repo.replace_artifacts(session, job_id, rows)


# An absolute POSIX path, not part of a URL or a relative path: what a message may carry
# of the worker's filesystem.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:~/>-])/[^\s'\"(),;:\[\]{}<>]+")


def _unexpected(exc: Exception) -> tuple[str, str]:
    """The code and message of a failure the engine did not name. A database error's text
    carries its SQL and parameters: only its class is shown."""
    name = type(exc).__name__
    if isinstance(exc, SQLAlchemyError):
        return (
            "database_error",
            f"a database error interrupted the job ({name}); retrying may help, and the "
            "operator has the worker's log",
        )
    if "OutOfMemory" in name:
        return (
            "out_of_memory",
            "the job ran out of GPU memory: lower hyperparameters.batch_size or "
            "max_length, raise gradient_accumulation_steps, or use adapter.type=lora",
        )
    return (
        "internal_error",
        f"the job failed unexpectedly ({name}: {str(exc)[:500]}); retrying may help, "
        "and the operator has the worker's log",
    )


def _json_safe(value: Any) -> Any:
    """Metrics go into a JSON column: floats like NaN become null."""
    import math

    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
