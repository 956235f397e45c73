"""Downloading an artifact: resumed over HTTP Range, through the presigned URL the
service redirects to, its sha256 checked, the archive unpacked."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from api.client.jobs import Jobs
from api.client.objects import Artifact
from api.client.transport import APIError, ChecksumError, _WaitRetryAfter


class Downloads(Jobs):
    """GET /v1/jobs/{id}/artifacts/{name}, to a directory."""

    def download_artifact(
        self,
        job_id: str,
        name: str,
        out_dir: str | os.PathLike[str],
        *,
        unpack: bool = True,
    ) -> Path:
        """Download an artifact (adapter, model, report) into `out_dir`, resuming a partial
        download left by an interrupted one (HTTP Range), and check its sha256. Returns the
        unpacked directory `out_dir/name`, or the archive with `unpack=False`."""
        artifact = next((a for a in self.artifacts(job_id) if a["name"] == name), None)
        if artifact is None:
            raise APIError(404, "artifact_not_found", f"job {job_id} has no artifact {name!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        archive = out / artifact["filename"]
        partial = archive.with_name(archive.name + ".part")
        resuming = Retrying(  # each try resumes where the last one's connection dropped
            retry=retry_if_exception_type(httpx.TransportError),
            wait=_WaitRetryAfter(self.max_wait),
            stop=stop_after_attempt(self.retries + 1),
            reraise=True,
        )
        for attempt in resuming:
            with attempt:
                self._fetch_to(job_id, artifact, partial)
        with partial.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != artifact["sha256"]:
            partial.unlink()
            raise ChecksumError(
                f"{name} of {job_id}: sha256 {digest} after download, the service recorded "
                f"{artifact['sha256']}; the partial file was removed, download it again"
            )
        partial.replace(archive)
        if not unpack:
            return archive
        target = out / name
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
        return target

    def _fetch_to(self, job_id: str, artifact: Artifact, partial: Path) -> None:
        """Bring `partial` to the artifact's full length: a Range request for what is
        missing, over the service or the presigned URL it redirects to."""
        have = partial.stat().st_size if partial.exists() else 0
        if have == artifact["bytes"]:
            return
        if have > artifact["bytes"]:
            partial.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{artifact["sha256"]}"'} if have else {}
        url = f"/v1/jobs/{job_id}/artifacts/{artifact['name']}"
        response = None
        for attempt in self._retrying():
            with attempt:
                request = self.http.build_request("GET", url, headers=headers)
                response = self.http.send(request, stream=True, follow_redirects=False)
                if response.status_code >= 400:
                    response.read()
                    response.close()
                    raise APIError.of(response)
        assert response is not None
        with httpx.Client(timeout=self.http.timeout) as plain:
            if response.is_redirect:
                # A presigned URL: no API key goes there, and its ETag is not the sha256.
                response.close()
                location = response.headers["location"]
                ranged = {"Range": f"bytes={have}-"} if have else {}
                response = plain.send(
                    plain.build_request("GET", location, headers=ranged), stream=True
                )
                if response.status_code >= 400:
                    response.read()
                    response.close()
                    raise APIError.of(response)
            try:
                mode = "ab" if response.status_code == 206 else "wb"
                with partial.open(mode) as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
            finally:
                response.close()
