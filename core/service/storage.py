"""Object storage for uploads and artifacts: a local directory, or S3 through boto3.

Both stores take whole files from local paths (uploads are spooled to a temporary
file while they are hashed and size-checked; artifacts are archives written by the
worker) and hand back streams or, on S3, short-lived presigned URLs. boto3 is imported
only when an S3 store is built, so core stays importable without it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from core.service.settings import Settings

CHUNK = 1024 * 1024


class Store(Protocol):
    def put(self, key: str, path: Path) -> None: ...
    def get(self, key: str, path: Path) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def presigned_url(self, key: str, filename: str) -> str | None: ...
    def local_path(self, key: str) -> Path | None: ...
    def check(self) -> None: ...


class LocalStore:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def put(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename: a reader never sees half an object.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def presigned_url(self, key: str, filename: str) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        """The object's file, which the API serves with HTTP ranges."""
        return self._path(key)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"artifact directory {self.root} is not writable")


class S3Store:
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_seconds: int = 300,
    ):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix, self.presign_seconds = bucket, prefix.strip("/"), presign_seconds
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"}
            ),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, path: Path) -> None:
        # upload_file does multipart uploads for big files; an object appears only when complete.
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(path))

    def open(self, key: str) -> BinaryIO:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def local_path(self, key: str) -> Path | None:
        return None  # served by a presigned URL (S3 answers ranges) or streamed whole

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError:
            return False

    def presigned_url(self, key: str, filename: str) -> str | None:
        return self.client.generate_presigned_url(
            "get_object",
            ExpiresIn=self.presign_seconds,
            Params={
                "Bucket": self.bucket,
                "Key": self._key(key),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
                "ResponseContentType": media_type(filename),
            },
        )

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def digest_prefix(self, uri: str) -> str:
        """core.service.signing.directory_digest of the objects under s3://bucket/prefix,
        streamed (nothing is written to disk)."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/"
        lines = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                digest = hashlib.sha256()
                for chunk in iter_stream(
                    self.client.get_object(Bucket=bucket, Key=obj["Key"])["Body"]
                ):
                    digest.update(chunk)
                lines.append(f"{rel} {digest.hexdigest()}")
        if not lines:
            raise FileNotFoundError(f"no objects under {uri}")
        return "sha256:" + hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()

    def download_prefix(self, uri: str, target: Path) -> None:
        """Copy every object under s3://bucket/prefix into target (a model directory)."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        found = False
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                found = True
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(bucket, obj["Key"], str(dest))
        if not found:
            raise FileNotFoundError(f"no objects under {uri}")


def make_store(settings: Settings) -> LocalStore | S3Store:
    if settings.s3_bucket:
        return S3Store(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            presign_seconds=settings.s3_presign_seconds,
        )
    return LocalStore(settings.local_store)


@dataclass
class Spooled:
    """An upload copied to a local temporary file, with its size and sha256."""

    path: Path
    bytes: int
    sha256: str


class TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


def spool(stream: BinaryIO, directory: Path, limit: int, suffix: str = "") -> Spooled:
    """Copy a stream to a temp file in chunks, hashing as it goes; TooLarge past `limit`
    (the partial file is removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(dir=directory, prefix="upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(limit)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Spooled(Path(name), size, digest.hexdigest())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingWriter:
    """A binary file that hashes what is written to it on the way through."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def archive_suffix(directory: Path, gzip_max_bytes: int) -> str:
    """`tar.gz` for a directory of at most `gzip_max_bytes` (an adapter, a report), `tar`
    above: model weights gain little from gzip and cost much time to compress."""
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return "tar.gz" if size <= gzip_max_bytes else "tar"


def media_type(filename: str) -> str:
    return "application/gzip" if filename.endswith(".gz") else "application/x-tar"


def make_archive(directory: Path, archive: Path) -> str:
    """A tar of `directory` with its files at the archive root, gzipped when `archive`
    ends in .gz; returns its sha256, computed while it is written (no second pass)."""
    mode = "w:gz" if archive.name.endswith(".gz") else "w|"  # a stream: the writer cannot tell()
    with archive.open("wb") as handle:
        writer = _HashingWriter(handle)
        with tarfile.open(fileobj=writer, mode=mode) as tar:  # type: ignore[call-overload]
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(directory)))
    return writer.digest.hexdigest()


def iter_stream(handle: Any, chunk: int = CHUNK) -> Iterator[bytes]:
    try:
        while data := handle.read(chunk):
            yield data
    finally:
        handle.close()
