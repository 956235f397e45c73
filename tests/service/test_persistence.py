"""Migrations (upgrade -> downgrade -> upgrade on SQLite and Postgres, and the models
match them), the lease on real Postgres, and the S3 store over HTTP."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine, inspect

from tests.service.conftest import add_job_row


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


APP_TABLES = {
    "api_keys",
    "models",
    "files",
    "jobs",
    "job_events",
    "artifacts",
    "tenants",
    "job_files",
}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_downgrade_upgrade(backend, tmp_path, pg_url):
    from sqlalchemy import text

    from core.service.migrate import downgrade, upgrade

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
    else:  # a scratch schema-free database of its own, so the session's database is untouched
        admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        name = pg_url.rsplit("/", 1)[1] + "_mig"
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = pg_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    assert APP_TABLES <= _tables(url)
    downgrade(url)
    assert _tables(url) & APP_TABLES == set()
    upgrade(url)
    assert APP_TABLES <= _tables(url)
    # The ORM models and the migrations describe the same schema.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from core.service.db import Base

    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    engine.dispose()
    assert diff == [], diff
    if backend == "postgres":
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def test_the_lease_lets_one_worker_in(migrated_pg, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from core.service import repo
    from core.service.db import Job, make_engine, make_sessionmaker, new_id, utcnow

    sessions = make_sessionmaker(make_engine(migrated_pg))
    job_id = new_id("job")
    add_job_row(sessions, job_id, step=0, attempts=0, cancel_requested=False)

    def take(owner: str) -> bool:
        with sessions.begin() as session:
            return repo.acquire_lease(session, job_id, owner, lease_seconds=30)

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(take, [f"worker-{i}" for i in range(8)]))
    assert wins.count(True) == 1  # eight deliveries race; one runs the job
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job.status == "running" and job.attempts == 1
        winner = job.lease_owner
        assert repo.renew_lease(session, job_id, winner, 30)
        assert not repo.renew_lease(session, job_id, "someone-else", 30)
        assert job_id not in [j.id for j in repo.orphaned_jobs(session)]
        # The worker dies: nobody renews; once the lease is past, the job is an orphan ...
        later = utcnow() + timedelta(seconds=31)
        assert job_id in [j.id for j in repo.orphaned_jobs(session, now=later)]
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
    # ... and the next delivery takes it over.
    assert take("worker-new") is True
    with sessions() as session:
        assert session.get(Job, job_id).lease_owner == "worker-new"
        assert session.get(Job, job_id).attempts == 2


def test_s3_store_over_http(s3_server, tmp_path):
    from core.service.settings import Settings
    from core.service.storage import S3Store, make_store

    store = make_store(
        Settings(
            unlearn_data_dir=tmp_path,
            s3_bucket=s3_server["S3_BUCKET"],
            s3_endpoint_url=s3_server["S3_ENDPOINT_URL"],
            s3_region="us-east-1",
            s3_prefix="tenantless",
        )
    )
    assert isinstance(store, S3Store)
    store.check()
    source = tmp_path / "a.bin"
    source.write_bytes(b"\x00\x01" * 100_000)
    store.put("x/a.bin", source)
    assert store.exists("x/a.bin")
    store.get("x/a.bin", tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == source.read_bytes()
    assert store.open("x/a.bin").read() == source.read_bytes()
    import httpx

    assert httpx.get(store.presigned_url("x/a.bin", "a.bin")).content == source.read_bytes()
    store.delete("x/a.bin")
    assert not store.exists("x/a.bin")


def test_archives_are_gzipped_up_to_a_size_and_plain_tar_above(tmp_path):
    """Weights barely compress; an artifact over ARCHIVE_GZIP_MAX_BYTES is a plain tar.
    Either way the sha256 returned is the file's, and tarfile reads it back."""
    import hashlib
    import os
    import tarfile

    from core.service.storage import archive_suffix, make_archive, media_type

    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text('{"a": 1}')
    (source / "model.safetensors").write_bytes(os.urandom(50_000))
    assert archive_suffix(source, 1_000_000) == "tar.gz"
    assert archive_suffix(source, 10_000) == "tar"
    for suffix, offset, magic in (("tar.gz", 0, b"\x1f\x8b"), ("tar", 257, b"ustar")):
        archive = tmp_path / f"model.{suffix}"
        digest = make_archive(source, archive)
        assert digest == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert archive.read_bytes()[offset : offset + len(magic)] == magic
        with tarfile.open(archive) as tar:
            assert sorted(tar.getnames()) == ["config.json", "model.safetensors"]
            payload = tar.extractfile("model.safetensors")
            assert payload is not None
            assert payload.read() == (source / "model.safetensors").read_bytes()
    assert media_type("j-model.tar") == "application/x-tar"
    assert media_type("j-adapter.tar.gz") == "application/gzip"
