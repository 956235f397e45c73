"""The database: SQLAlchemy 2.0 models (Postgres in production, SQLite embedded).

Postgres holds the truth about a job: its spec, status, progress, lease, error,
events, metrics and artifacts. The broker only carries job ids. The schema is created
and changed by Alembic (migrations/), never by `create_all` in production code.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from core.service.enums import JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Unguessable ids with a type prefix (file-..., job-...)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def looks_like_id(prefix: str, value: str) -> bool:
    """Whether `value` has the shape of an id `new_id(prefix)` makes: anything else is no id
    of this service, and needs no query to say so."""
    return (
        len(value) == len(prefix) + 25
        and re.fullmatch(rf"{prefix}-[0-9a-f]{{24}}", value) is not None
    )


class UTCDateTime(TypeDecorator):
    """Timezone-aware datetimes in and out: Postgres keeps the zone; SQLite drops it, so
    values are stored as UTC and UTC is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    # sha256 of the key: keys are 256-bit random, so a fast hash is enough to make a leaked
    # table useless; the plain key is shown once, at creation.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), doc="First characters, to tell keys apart.")
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Tenant(Base):
    """A tenant and the operator's overrides of the per-tenant limits (NULL: the
    setting's default). Its row is also what job creation and uploads lock, so that the
    checks of a tenant's limits and the inserts they guard are one step."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_job_tokens: Mapped[int | None] = mapped_column(BigInteger)
    rate_limit: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RegisteredModel(Base):
    """A base model an operator registered (`unlearn models add`). Tenants name it; they
    never pass paths."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    uri: Mapped[str] = mapped_column(Text, doc="Local directory or s3://bucket/prefix.")
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    digest: Mapped[str | None] = mapped_column(
        String(80), doc="sha256 over its files' paths and sha256s, computed at registration."
    )
    parameters: Mapped[int | None] = mapped_column(
        BigInteger, doc="From its safetensors headers at registration (None: not known)."
    )
    needs_gb: Mapped[float | None] = mapped_column(
        Float, doc="Device memory a job on it needs, as the operator said (else estimated)."
    )
    reference_for: Mapped[str | None] = mapped_column(
        String(200), doc="The base model this one stands beside: trained without the forget set."
    )


class File(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(500))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), doc="core.service.enums.FileStatus")
    kind: Mapped[str | None] = mapped_column(String(16), doc="qa | chat | text | mc")
    records: Mapped[int | None] = mapped_column(Integer)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, str] | None] = mapped_column(
        "metadata", JSON, doc="The tenant's map of strings (core.service.metadata)."
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    method: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(200))
    forget_file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="RESTRICT"))
    retain_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="RESTRICT"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, doc="The validated request, with file ids.")
    init_from_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="RESTRICT", name="fk_jobs_init_from_job_id"),
        doc="Sequential unlearning: the succeeded job whose output this one starts from.",
    )
    chain: Mapped[list[str] | None] = mapped_column(
        JSON, doc="The jobs before it in its chain, first job first (init_from_job last)."
    )
    meta: Mapped[dict[str, str] | None] = mapped_column(
        "metadata", JSON, doc="The tenant's map of strings (core.service.metadata)."
    )
    key_id: Mapped[str | None] = mapped_column(String(40), doc="The API key that submitted it.")
    certificate: Mapped[str | None] = mapped_column(
        Text, doc="The signed certificate (canonical JSON), once the job has succeeded."
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    phase: Mapped[str | None] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_class: Mapped[str | None] = mapped_column(
        String(64), doc="The class of worker it was routed to (None: the one queue)."
    )

    # The lease: a worker owns a running job until lease_expires_at; its heartbeat renews it.
    # A second delivery finds the lease live and backs off; an expired lease means the
    # worker died and the job may be taken over (and resumes from its last checkpoint).
    enqueued_at: Mapped[datetime | None] = mapped_column(
        doc="When the id was last sent to the broker; a queued job sent long ago is re-sent."
    )
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobFile(Base):
    """Every file a job names, by slot (forget_file, retain_file, eval.forget_qa, ...):
    the database refuses to delete a file a job still names, whatever its slot."""

    __tablename__ = "job_files"
    __table_args__ = (Index("ix_job_files_file", "file_id"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    slot: Mapped[str] = mapped_column(String(32), primary_key=True)
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="RESTRICT"))


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job_seq", "job_id", "seq"),
        UniqueConstraint("job_id", "number", name="uq_job_events_job_number"),
    )

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(
        Integer, doc="1, 2, 3... within the job: the id tenants see (seq is global)."
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[str] = mapped_column(String(16), doc="core.service.enums.EventType")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class SigningKey(Base):
    """A public key that signs certificates (core.service.signing), published by the API;
    the private key stays in the signer's keyring."""

    __tablename__ = "signing_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """One entry of a tenant's tamper-evident audit chain (core.service.audit). Only ever
    inserted; the database refuses UPDATE and DELETE on the table."""

    __tablename__ = "audit_log"
    __table_args__ = (UniqueConstraint("tenant", "number", name="uq_audit_log_tenant_number"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant: Mapped[str] = mapped_column(String(100))
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(100), doc="A key id, operator, or worker.")
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[str | None] = mapped_column(String(200))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Artifact(Base):
    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True, doc="adapter | model | report")
    kind: Mapped[str] = mapped_column(String(32), doc="peft_adapter | hf_model | report")
    filename: Mapped[str] = mapped_column(String(200))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Webhook(Base):
    """A tenant's endpoint for push notifications (core.service.webhooks)."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_tenant_created", "tenant", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100), doc="whsec_...: signs every delivery")
    description: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One message to one endpoint, written in the transaction of the change it reports
    (an outbox: nothing is lost if a process dies), sent and retried by the workers."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook", "webhook_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, doc="msg-...: webhook-id")
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(100))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), doc="pending | succeeded | failed")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()


# Each engine's pool: POOL_SIZE connections kept, and up to the overflow more at once.
# A SQLite file's connections are cheap: one per API thread.
POOL_SIZE, OVERFLOW, SQLITE_OVERFLOW = 10, 20, 30


def make_engine(url: str, *, busy_timeout: float = 30.0) -> Engine:
    """An engine for Postgres (pooled, connections checked before use) or SQLite (WAL,
    foreign keys on; a writer waits up to `busy_timeout` seconds for another's lock)."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout},
            pool_size=POOL_SIZE,
            max_overflow=SQLITE_OVERFLOW,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while the worker writes; foreign keys are off by default.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=OVERFLOW)


def pool_capacity(engine: Engine) -> int:
    """The most connections make_engine's pool for this engine hands out at once."""
    return POOL_SIZE + (SQLITE_OVERFLOW if engine.url.get_backend_name() == "sqlite" else OVERFLOW)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
