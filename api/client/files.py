"""Uploading, reading, listing and deleting files (/v1/files)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from api.client.objects import File
from api.client.transport import APIError, Transport


class Files(Transport):
    """The /v1/files endpoints."""

    def upload_file(
        self,
        path: str | os.PathLike[str],
        purpose: str,
        *,
        metadata: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 600,
    ) -> File:
        """Upload a JSONL or .txt file. Large files are validated after the upload: with
        `wait` this returns once validation has finished (valid or invalid: look at
        `status` and `validation`)."""
        path = Path(path)
        data = {"purpose": purpose}
        if metadata:
            data["metadata"] = json.dumps(dict(metadata))
        response = None
        # An upload is not idempotent: retried only where the service did not take it.
        for attempt in self._retrying(once_only=True):
            with attempt, path.open("rb") as handle:
                response = self.http.post(
                    "/v1/files", data=data, files={"file": (path.name, handle)}
                )
                if response.status_code >= 400:
                    raise APIError.of(response)
        assert response is not None
        file: File = response.json()
        deadline = time.monotonic() + timeout
        while wait and file["status"] == "validating":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{file['id']} still validating after {timeout:.0f} s")
            time.sleep(0.5)
            file = self.get_file(file["id"])
        return file

    def get_file(self, file_id: str) -> File:
        result: File = self._json("GET", f"/v1/files/{file_id}")
        return result

    def list_files(
        self,
        *,
        purpose: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> Iterator[File]:
        """Newest first, every page (or the first `limit`)."""
        return self._pages(
            "/v1/files", {"purpose": purpose, **self._metadata_params(metadata)}, limit
        )

    def delete_file(self, file_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("DELETE", f"/v1/files/{file_id}")
        return result
