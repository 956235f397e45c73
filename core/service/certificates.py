"""The unlearning certificate of a succeeded job: what was asked, of which model, with
which inputs, what came out, what was measured and whether the declared criteria held.
It is an in-toto Statement v1 in a DSSE envelope (core.service.attestation): its subjects
the sha256 of each artifact archive, its predicate this unlearning record, signed with
the published Ed25519 keys so anyone can check it offline with the public key."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.service import attestation, audit, repo
from core.service.db import Job, SigningKey, utcnow
from core.service.signing import Keyring, public_pem

# The artifacts that are model directories, signed in place with OpenSSF model signing.
MODEL_ARTIFACTS = ("adapter", "model")


@functools.cache
def code_version() -> str:
    """The package version, and the commit where one is known (UNLEARN_COMMIT, or the
    checkout's git HEAD)."""
    version = importlib.metadata.version("unlearn-service")
    commit = os.environ.get("UNLEARN_COMMIT")
    if not commit:
        root = Path(__file__).resolve().parents[2]
        if (root / ".git").exists():
            try:
                commit = subprocess.run(
                    ["git", "rev-parse", "HEAD"],
                    cwd=root,
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                commit = None
    return f"{version}+{commit}" if commit else version


def publish(session: Session, keyring: Keyring) -> str:
    """Make sure the keyring's active keys exist and their public halves are published
    (Ed25519 for certificates, ECDSA P-256 for model signatures)."""
    kid = keyring.ensure()
    published: dict[str, Any] = {**keyring.public_keys(), **keyring.model_public_keys()}
    for known, public in published.items():
        if session.get(SigningKey, known) is None:
            session.add(SigningKey(id=known, public_key_pem=public_pem(public)))
    session.flush()
    return kid


def public_keys(session: Session) -> list[SigningKey]:
    return list(session.scalars(select(SigningKey).order_by(SigningKey.created_at)).all())


def _when(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def content(session: Session, job: Job, keyring: Keyring) -> dict[str, Any]:
    """The unlearning record of a finished job (its artifacts and metrics stored): the
    predicate of its certificate."""
    model = repo.get_model(session, job.base_model)
    spec = dict(job.spec)
    slots = repo.job_file_slots(session, job.id)
    files = repo.files_by_id(session, job.tenant, set(slots.values()))
    reference_name = (spec.get("eval") or {}).get("reference_model")
    reference = repo.find_model(session, reference_name) if reference_name else None
    metrics = job.metrics or {}
    artifacts = repo.list_artifacts(session, job.id)
    signed = [a.name for a in artifacts if a.name in MODEL_ARTIFACTS]
    return {
        "issued_at": utcnow().isoformat(),
        "job": {
            "id": job.id,
            "tenant": job.tenant,
            "submitted_by_key": job.key_id,
            "created_at": _when(job.created_at),
            "started_at": _when(job.started_at),
            "finished_at": _when(job.finished_at),
            "attempts": job.attempts,
        },
        "base_model": {"name": model.name, "digest": model.digest},
        "reference_model": (
            {"name": reference.name, "digest": reference.digest} if reference is not None else None
        ),
        "inputs": {
            slot: {
                "file_id": file_id,
                "filename": files[file_id].filename,
                "sha256": files[file_id].sha256,
                "bytes": files[file_id].bytes,
            }
            for slot, file_id in sorted(slots.items())
            if file_id in files
        },
        "starts_from": _starts_from(session, job),
        "spec": spec,
        "profile": spec.get("profile") or "standard",
        "stages": stages(spec, metrics),
        "code_version": code_version(),
        "artifacts": {
            a.name: {"filename": a.filename, "bytes": a.bytes, "sha256": a.sha256}
            for a in artifacts
        },
        "model_signature": (
            {
                "artifacts": signed,
                "file": attestation.MODEL_SIGNATURE,
                "format": "OpenSSF model signing (Sigstore bundle, DSSE, ECDSA P-256)",
                "key_id": keyring.model_key()[0],
            }
            if signed
            else None
        ),
        "audits": audits(spec, metrics),
        "metrics": metrics,
        "criteria": metrics.get("criteria", []),
        "verdict": metrics.get("verdict", "not_evaluated"),
        "audit_head": audit.head(session, job.tenant),
    }


def _starts_from(session: Session, job: Job) -> dict[str, Any] | None:
    """A sequential job's link to the job it started from: that job's id, the sha256 of
    its artifacts (the weights this job trained from) and of its own certificate, so the
    certificates of a chain verify one after another; and the chain before it."""
    if job.init_from_job_id is None:
        return None
    previous = repo.get_job(session, None, job.init_from_job_id)
    return {
        "job": previous.id,
        "chain": list(job.chain or []),
        "artifacts": {a.name: a.sha256 for a in repo.list_artifacts(session, previous.id)},
        "certificate_sha256": (
            hashlib.sha256(previous.certificate.encode()).hexdigest()
            if previous.certificate is not None
            else None
        ),
    }


def stages(spec: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """What changed the weights, in order, as the metrics record it ran: the unlearning
    (its method, retain term, selective updates and attack in the loop, steps done), then
    the distillation stage where the job had one."""
    hyper = metrics.get("hyperparameters") or spec.get("hyperparameters") or {}
    done = [
        {
            "stage": "unlearning",
            "method": metrics.get("method", spec.get("method")),
            "retain_loss": hyper.get("retain_loss", "none"),
            "selective": hyper.get("selective"),
            "attack_in_loop": hyper.get("attack_in_loop"),
            "steps": metrics.get("steps"),
        }
    ]
    robustify = metrics.get("robustify")
    if robustify:
        done.append(
            {
                "stage": "distillation",
                "options": robustify.get("options"),
                "steps": robustify.get("steps"),
                "stop_reason": robustify.get("stop_reason"),
                "output": robustify.get("output"),
            }
        )
    return done


def audits(spec: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every audit the job's metrics hold, with its status, its settings where it ran
    and why where it did not: the record claims only what was run."""
    if spec.get("eval") is None:
        why = "the spec has no eval section"
        return [
            {"audit": name, "status": "off", "reason": why} for name in ("robustness", "privacy")
        ]
    declared = spec["eval"]
    rows = [
        _audit(f"robustness.{name}", result, (declared.get("robustness") or {}).get(name))
        for name, result in sorted((metrics.get("robustness") or {}).items())
    ]
    privacy = metrics.get("privacy") or {}
    rows += [
        _audit(f"privacy.{when}", privacy[when], declared.get("privacy"))
        for when in ("before", "after", "reference")
        if when in privacy
    ]
    return rows or [{"audit": "all", "status": "off", "reason": "no audit in the job's metrics"}]


_CELL_KEYS = ("cell", "data", "learning_rate", "steps", "status", "recovery", "reason")


def _audit(name: str, result: Any, declared: Any) -> dict[str, Any]:
    """One audit's row: its status; the settings it ran with (as measured, else as the
    spec declared them) or the reason it did not run."""
    if not isinstance(result, dict) or "status" not in result:
        return {"audit": name, "status": "unknown", "reason": "no status recorded"}
    row = {"audit": name, "status": result["status"]}
    if result["status"] == "done":
        row["settings"] = result.get("settings", declared)
        if "cells" in result:  # a sweep (the relearning attack): every cell it ran
            row["cells"] = [
                {key: cell.get(key) for key in _CELL_KEYS if key in cell}
                for cell in result["cells"]
            ]
            row["worst_cell"] = result.get("worst_cell")
    else:
        row["reason"] = result.get("reason") or "none recorded"
    return row


def issue(session: Session, job: Job, keyring: Keyring) -> bytes:
    """Sign the job's certificate (a DSSE envelope of its in-toto statement) and keep it
    on the job's row."""
    publish(session, keyring)
    record = content(session, job, keyring)
    subjects = {a["filename"]: a["sha256"] for a in record["artifacts"].values()}
    certificate = attestation.sign_statement(keyring, attestation.statement(subjects, record))
    job.certificate = certificate.decode()
    return certificate
