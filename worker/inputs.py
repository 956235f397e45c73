"""A job's inputs on this worker: its spec with every file, model and starting point
replaced by a local copy, and the checkpoint a previous worker of the job left in the
store. Each local path is added to the job's redactions as soon as it is known, so a
failure while fetching already names it as the tenant knows it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from core.engine.spec.parts import EVAL_FILE_FIELDS, spec_file_ids
from core.errors import UnlearnError
from core.service import repo
from core.service.db import Artifact, File, Job, RegisteredModel
from core.service.settings import Settings
from core.service.storage import S3Store, Store, file_sha256
from worker.progress import checkpoint_key
from worker.redaction import Redactions

if TYPE_CHECKING:
    from core.engine.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInputs:
    """What the pipeline is given for one job: the spec with local paths; how the report
    names the model and the forget file for the tenant (the model's name; the file's id
    and name); the chain of jobs before it, by job id, or None."""

    spec: JobSpec
    shown: dict[str, str]
    chain: list[dict[str, Any]] | None


def fetch_inputs(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: Store,
    job_id: str,
    directory: Path,
    redactions: Redactions,
) -> JobInputs:
    """The job's spec with file ids replaced by local copies under `directory`, model
    names by local directories and init_from_job by the previous job's output."""
    from core.engine.spec import parse_spec

    with sessions() as session:
        job = repo.get_job(session, None, job_id)
        raw = dict(job.spec)
        model = repo.get_model(session, job.base_model)
        files = repo.files_by_id(session, job.tenant, spec_file_ids(raw))
    directory.mkdir(parents=True, exist_ok=True)
    raw["base_model"] = str(model_dir(settings, store, model.uri))
    redactions.add(raw["base_model"], f"model '{model.name}'")
    redactions.add(directory, "<inputs>")
    _localise_reference(settings, sessions, store, raw, redactions)
    shown = _shown(job_id, raw, model, files)
    chain = None
    if raw.get("init_from_job"):
        start_dir, chain = fetch_start(sessions, store, job_id, directory / "start")
        redactions.add(start_dir, f"job {raw['init_from_job']}'s output")
        raw["init_from_job"] = str(start_dir)
    _localise_files(store, raw, files, directory)
    return JobInputs(parse_spec(raw), shown, chain)


def _localise_reference(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: Store,
    raw: dict[str, Any],
    redactions: Redactions,
) -> None:
    """Replace eval.reference_model in `raw`, a registered model's name, by its local
    directory."""
    reference_name = (raw.get("eval") or {}).get("reference_model")
    if not reference_name:
        return
    with sessions() as session:
        reference = repo.get_model(session, reference_name)
    local = str(model_dir(settings, store, reference.uri))
    raw["eval"] = {**raw["eval"], "reference_model": local}
    redactions.add(local, f"model '{reference.name}'")


def _shown(
    job_id: str, raw: dict[str, Any], model: RegisteredModel, files: dict[str, File]
) -> dict[str, str]:
    """How the report names the job's model and forget file: as the tenant knows them."""
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
    return shown


def _localise_files(
    store: Store, raw: dict[str, Any], files: dict[str, File], directory: Path
) -> None:
    """Replace the file ids in `raw` (forget, retain, contrast and eval sets) by local
    copies under `directory`."""
    raw["forget_file"] = _fetch_file(store, files, raw["forget_file"], directory)
    raw["retain_file"] = _fetch_file(store, files, raw.get("retain_file"), directory)
    raw["contrast_file"] = _fetch_file(store, files, raw.get("contrast_file"), directory)
    raw["distill_file"] = _fetch_file(store, files, raw.get("distill_file"), directory)
    if raw.get("eval"):
        raw["eval"] = {
            key: (_fetch_file(store, files, value, directory) if key in EVAL_FILE_FIELDS else value)
            for key, value in raw["eval"].items()
        }


def _fetch_file(
    store: Store, files: dict[str, File], file_id: str | None, directory: Path
) -> str | None:
    """The local path of the file `file_id`, copied from the store unless a copy with
    its sha256 is already there."""
    if file_id is None:
        return None
    row = files.get(file_id)
    if row is None:
        raise UnlearnError(
            f"file {file_id} was deleted after the job was created",
            code="file_not_found",
            param="forget_file",
        )
    target = directory / f"{row.id}{Path(row.filename).suffix.lower() or '.jsonl'}"
    if not target.is_file() or file_sha256(target) != row.sha256:
        store.get(row.storage_key, target)
    return str(target)


def restore_checkpoint(settings: Settings, store: Store, job_id: str, directory: Path) -> None:
    """A job taken over on another host (its local checkpoints are not here) gets the
    last checkpoint its previous worker copied to the store."""
    from core.engine.checkpoint import latest_checkpoint

    if latest_checkpoint(directory) is not None or not settings.checkpoints_to_store:
        return
    if not store.exists(checkpoint_key(job_id)):
        return
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / ".restore.tar"
    store.get(checkpoint_key(job_id), archive)
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    archive.unlink()
    log.info("job %s: restored its checkpoint from the store", job_id)


def fetch_start(
    sessions: sessionmaker[Session], store: Store, job_id: str, directory: Path
) -> tuple[Path, list[dict[str, Any]]]:
    """The output of the job this one starts from, from the store into `directory` as
    the engine reads it (adapter/ after a LoRA job, else model/), its archive checked
    against the sha256 recorded when it was stored; and the chain, first job first."""
    with sessions() as session:
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
    artifact = artifacts[name]
    chain = _chain(ids, rows, name)
    chain[-1]["sha256"] = artifact.sha256  # checked below: names the start for resumes
    if not (directory / ".complete").is_file():  # else fetched by an earlier attempt
        _download_start(store, artifact, directory)
    return directory, chain


def _chain(ids: list[str], rows: dict[str, Job], last_output: str) -> list[dict[str, Any]]:
    """Each job of the chain with its method and what the engine started from after it
    (`last_output` after the last one)."""

    def output(job_id: str) -> str:
        if job_id == ids[-1]:
            return last_output
        spec = rows[job_id].spec if job_id in rows else {}
        return "adapter" if (spec.get("adapter") or {}).get("type") == "lora" else "model"

    return [
        {"job": i, "method": rows[i].method if i in rows else None, "output": output(i)}
        for i in ids
    ]


def _download_start(store: Store, artifact: Artifact, directory: Path) -> None:
    """Unpack `artifact` into directory/<its name>, once its sha256 is checked; a
    .complete marker says it is there."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    archive = directory / artifact.filename  # tar or tar.gz: tarfile tells them apart
    store.get(artifact.storage_key, archive)
    if file_sha256(archive) != artifact.sha256:
        raise UnlearnError(
            f"init_from_job: the {artifact.name} of job {artifact.job_id} in the store does "
            "not match the sha256 recorded when it was stored; the operator should check "
            "the store",
            code="artifact_corrupt",
            param="init_from_job",
        )
    with tarfile.open(archive) as tar:
        tar.extractall(directory / artifact.name, filter="data")
    archive.unlink()
    (directory / ".complete").write_text(artifact.sha256)


def model_dir(settings: Settings, store: Store, uri: str) -> Path:
    """The local directory of the model at `uri`: the path itself, or for s3:// a copy
    in the worker's model cache, downloaded once."""
    if not uri.startswith("s3://"):
        return Path(uri)
    cache = settings.work_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (cache / ".complete").is_file():
        return cache
    if not isinstance(store, S3Store):
        raise UnlearnError(
            f"model {uri} is on S3 but S3 is not configured (S3_BUCKET)",
            code="model_unavailable",
        )
    partial = cache.with_name(cache.name + f".part-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    store.download_prefix(uri, partial)
    (partial / ".complete").touch()
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)
    return cache
