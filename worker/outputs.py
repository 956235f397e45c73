"""A job's outputs: each artifact directory the pipeline wrote is archived, uploaded to
the store and recorded as one of the job's artifact rows (a model directory, the adapter
or full weights, signed first with OpenSSF model signing: its `model.sig` travels in the
archive); a succeeded job is certified (its signed in-toto attestation is kept on its
row)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core.service import attestation, certificates, repo
from core.service.db import Artifact, Job
from core.service.enums import ArtifactKind
from core.service.settings import Settings
from core.service.signing import Keyring
from core.service.storage import Store, archive_suffix, make_archive

ARTIFACT_KINDS = {
    "adapter": ArtifactKind.PEFT_ADAPTER,
    "model": ArtifactKind.HF_MODEL,
    "report": ArtifactKind.REPORT,
}


def store_artifacts(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: Store,
    job_id: str,
    artifacts: dict[str, Path],
    archives: Path,
) -> None:
    """Archive each of `artifacts` (name: directory) under `archives`, upload it to the
    store under jobs/<job id>/, and make the archives the job's artifact rows."""
    archives.mkdir(parents=True, exist_ok=True)
    keyring = Keyring(settings.keyring_dir)
    rows = []
    for name, directory in artifacts.items():
        if name in certificates.MODEL_ARTIFACTS:
            attestation.sign_model(directory, keyring)
        suffix = archive_suffix(directory, settings.archive_gzip_max_bytes)
        archive = archives / f"{name}.{suffix}"
        sha256 = make_archive(directory, archive)
        key = f"jobs/{job_id}/{name}.{suffix}"
        store.put(key, archive)
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
    with sessions.begin() as session:
        repo.replace_artifacts(session, job_id, rows)


def certify(session: Session, job: Job, settings: Settings) -> None:
    """Sign the succeeded job's certificate with the operator's keyring and keep it on
    the job's row (in `session`, with the outcome it certifies)."""
    certificates.issue(session, job, Keyring(settings.keyring_dir))
