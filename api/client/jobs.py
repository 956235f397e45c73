"""Submitting and reading jobs (/v1/jobs), their metrics, artifacts and certificate, the
audit log, the signing keys and the models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from api.client.files import Files
from api.client.objects import FILE_SLOTS, Artifact, Job, problems_of


class Jobs(Files):
    """The /v1/jobs endpoints and the read-only ones beside them; a spec's local files
    are uploaded before it is submitted (`upload_spec_files`)."""

    def submit_job(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """POST /v1/jobs. Retried submissions carry the same Idempotency-Key, so a retry
        after a lost answer returns the job created the first time."""
        key = idempotency_key or f"client-{uuid.uuid4()}"
        result: Job = self._json(
            "POST", "/v1/jobs", json=dict(spec), headers={"Idempotency-Key": key}
        )
        return result

    def upload_spec_files(
        self,
        spec: Mapping[str, Any],
        base_dir: str | os.PathLike[str] = ".",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A copy of `spec` in which every file slot naming a local file (relative to
        `base_dir`) holds the id of that file, uploaded with the slot's purpose. Ids and
        values that are no local file are left as they are. Raises ValueError naming the
        slot and the file's first problems if an upload is invalid."""
        spec = dict(spec)
        if isinstance(spec.get("eval"), Mapping):
            spec["eval"] = dict(spec["eval"])
        uploaded: dict[tuple[Path, str], str] = {}
        for slot, purpose in FILE_SLOTS.items():
            holder, key = (spec.get("eval"), slot[5:]) if slot.startswith("eval.") else (spec, slot)
            if not isinstance(holder, dict) or not isinstance(holder.get(key), str):
                continue
            path = Path(base_dir, holder[key]).expanduser()
            if not path.is_file():
                continue
            if (path, purpose) not in uploaded:
                file = self.upload_file(path, purpose, metadata=metadata)
                if file["status"] != "valid":
                    raise ValueError(f"{slot}: " + "; ".join(problems_of(file, path)))
                uploaded[(path, purpose)] = file["id"]
            holder[key] = uploaded[(path, purpose)]
        return spec

    def get_job(self, job_id: str) -> Job:
        """The job as it is now: past the server's status cache (`Cache-Control:
        no-cache`), so a script sees what it or the worker just changed."""
        result: Job = self._json("GET", f"/v1/jobs/{job_id}", headers={"Cache-Control": "no-cache"})
        return result

    def list_jobs(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> Iterator[Job]:
        """Newest first, every page (or the first `limit`)."""
        return self._pages("/v1/jobs", {"status": status, **self._metadata_params(metadata)}, limit)

    def cancel_job(self, job_id: str) -> Job:
        result: Job = self._json("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def metrics(self, job_id: str) -> dict[str, Any] | None:
        """The job's metrics (before/after, evidence, verdict); None until it has them."""
        result: dict[str, Any] | None = self._json("GET", f"/v1/jobs/{job_id}/metrics")["metrics"]
        return result

    def artifacts(self, job_id: str) -> list[Artifact]:
        result: list[Artifact] = self._json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]
        return result

    def certificate(self, job_id: str) -> bytes:
        """The signed certificate, byte for byte as signed (verify with `unlearn verify`)."""
        return self._request("GET", f"/v1/jobs/{job_id}/certificate").content

    def audit(self, *, after: int | None = None) -> Iterator[dict[str, Any]]:
        """The tenant's audit log, oldest first; each entry carries the hash of the one
        before (check the chain with `unlearn audit verify` on the operator's side)."""
        return self._pages("/v1/audit", {"after": after}, None)

    def signing_keys(self) -> list[dict[str, Any]]:
        """The public keys certificates are signed with (published: no key needed)."""
        result: list[dict[str, Any]] = self._json("GET", "/v1/signing-keys")["data"]
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/models")["data"]
        return result
