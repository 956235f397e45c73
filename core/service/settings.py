"""Service settings (pydantic-settings), read from the environment and validated at start-up.

Per-job ML parameters are not settings: they are the typed job spec (core.engine.spec).
With nothing set, the service is the embedded default: SQLite and a local artifact
directory under UNLEARN_DATA_DIR, and a broker that needs no server (a SQLite
queue through kombu's SQLAlchemy transport). Setting DATABASE_URL, BROKER_URL and
S3_BUCKET switches to Postgres, Redis and S3 with the same code paths.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    unlearn_data_dir: Path = Field(Path(".unlearn"), description="State of the embedded default.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite in the data dir."
    )
    sqlite_busy_timeout_seconds: float = Field(
        30.0, gt=0, description="Embedded: how long a write waits for another's lock (then 503)."
    )
    broker_url: str | None = Field(
        None, description="Celery broker; default a SQLite queue in the data dir."
    )

    # Artifact and upload storage: a local directory unless S3_BUCKET is set.
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(
        None, description="For MinIO and other S3-compatible servers."
    )
    s3_region: str | None = None
    s3_presign_seconds: int = Field(300, ge=10, le=7 * 24 * 3600)
    s3_redirect_downloads: bool = Field(
        True, description="Answer artifact downloads with a 307 to a presigned URL."
    )

    auth_cache_seconds: float = Field(
        10.0, ge=0, description="How long a verified API key is trusted without a lookup."
    )
    status_cache_seconds: float = Field(
        1.0,
        ge=0,
        description="`GET /v1/jobs/{id}` answers are reused this long per tenant and job "
        "(many dashboards on one job: one query per interval); 0: off.",
    )
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1, description="413 beyond this.")
    webhook_allow_private: bool = Field(
        False,
        description="Let webhooks target loopback and private addresses (off: SSRF guard).",
    )
    webhook_poll_seconds: float = Field(
        2.0, gt=0, description="How often a worker looks for due webhook deliveries."
    )
    webhook_lease_seconds: float = Field(
        60.0, gt=0, description="A sender's hold on a delivery; another retries after it."
    )
    webhook_retry_schedule: list[float] | None = Field(
        None,
        description="Seconds before each retry (JSON list); default: about a day, "
        "core.service.webhooks.SCHEDULE.",
    )
    model_cache_bytes: int = Field(
        0,
        ge=0,
        description="Host memory a worker may keep base models in between jobs: a later "
        "LoRA job on the same model shares the kept weights, a full-weight job copies them, "
        "instead of loading the files. Off by default: where the files fit the page cache, "
        "loading them (memory-mapped) is about as fast as a shared hit and faster than a "
        "copy (docs/performance.md); it pays on slow or network storage.",
    )
    archive_gzip_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Artifacts whose files are larger than this are plain .tar, not .tar.gz: "
        "weights barely compress and gzip writes them 40x slower (docs/performance.md).",
    )
    max_record_chars: int = Field(1_000_000, ge=1)
    validate_inline_bytes: int = Field(
        8 * 1024 * 1024,
        ge=0,
        description="Files up to this size are validated before the upload answers; "
        "larger ones answer `validating` and are validated in the background.",
    )

    # What one request may cost: bodies are capped and must arrive in time, headers too;
    # connections beyond max_connections are answered 503.
    max_json_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="413 for a request body (other than an upload) beyond this.",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A connection whose request headers are not all in by then is closed.",
    )
    body_timeout_seconds: float = Field(
        60.0, gt=0, description="408 when a request body (other than an upload) takes longer."
    )
    upload_timeout_seconds: float = Field(
        900.0, gt=0, description="408 when an upload's body takes longer."
    )
    max_connections: int = Field(
        1000, ge=1, description="Concurrent connections per API process; 503 beyond."
    )
    max_connections_per_client: int = Field(
        256,
        ge=0,
        description="Connections one client address may hold open to one API process (a "
        "quarter of MAX_CONNECTIONS: room for an office of dashboards behind one NAT); "
        "beyond, a connection is answered 503 and closed before it counts towards "
        "MAX_CONNECTIONS. 0: no cap (behind a reverse proxy, whose address all share: "
        "the proxy caps per client instead).",
    )

    # Fair sharing, per tenant: defaults an operator overrides per tenant
    # (`unlearn tenants set TENANT ...`). Rate limits are `limits` strings such as
    # "20/second;600/minute", shared through Redis when BROKER_URL is Redis.
    rate_limit: str = Field(
        "20/second;600/minute",
        description="Requests per tenant that write or cost: every method but GET and HEAD, "
        "and artifact downloads (`unlearn tenants set` overrides it per tenant).",
    )
    read_rate_limit: str = Field(
        "500/second;20000/minute",
        description="GET and HEAD requests per tenant other than artifact downloads: status "
        "polls, lists, events, metrics; dashboards polling a tenant's jobs once a second.",
    )
    anonymous_rate_limit: str = Field(
        "10/second;120/minute", description="Requests without a valid key, per client address."
    )
    rate_limit_storage_url: str | None = Field(
        None, description="limits storage URI; default: the Redis broker, else in-process memory."
    )
    rate_limit_wait_seconds: float = Field(
        5.0,
        gt=0,
        description="How long a request waits for one of an API process's 32 connections "
        "to the rate limit's Redis before it is a 503.",
    )
    max_active_jobs: int = Field(4, ge=1, description="Queued or running jobs per tenant.")
    max_stored_bytes: int = Field(
        10 * 1024**3, ge=0, description="Bytes of uploaded files a tenant may keep."
    )
    events_poll_seconds: float = Field(
        0.5,
        gt=0,
        le=60,
        description="How often an event stream looks for a job's new events (one short "
        "query each time; no connection is held between).",
    )
    max_streams_per_tenant: int = Field(
        20,
        ge=1,
        description="Event streams (/events/stream) one tenant may hold open in one API "
        "process; 429 with Retry-After beyond (poll /events instead, or close one).",
    )
    stream_idle_seconds: float = Field(
        300.0,
        gt=0,
        description="An event stream that has carried no event for this long is closed "
        "(a comment says so); the client reconnects with Last-Event-ID and misses nothing.",
    )
    max_chain_jobs: int = Field(
        16,
        ge=1,
        le=1000,
        description="Jobs before a job in a chain of init_from_job (after LoRA jobs, the "
        "chain's one adapter has the rank of them all).",
    )
    max_job_tokens: int = Field(
        500_000_000,
        ge=1,
        le=10**15,
        description="Tokens one job may train on: steps x batch x accumulation x max_length.",
    )

    # Certificates: the keyring of the processes that sign them (the workers; `unlearn
    # signing-keys`). A key is generated where there is none.
    signing_keys_dir: Path | None = Field(
        None, description="Private signing keys; default UNLEARN_DATA_DIR/signing-keys."
    )

    # Workers
    worker_device: str | None = Field(
        None, description="cpu, cuda, cuda:0; default cuda if present."
    )
    worker_threads: int = Field(
        0,
        ge=0,
        description="torch threads per worker process; 0 = all cores (the worker `unlearn "
        "serve` starts beside the API: all but one).",
    )
    loss_backend: Literal["auto", "eager", "compiled", "triton"] = Field(
        "auto",
        description="How the worker computes token log-probs (core.engine.losses): auto is "
        "the fused Triton kernels on CUDA and eager on the CPU; compiled pays a one-off "
        "torch.compile on the first job of a process.",
    )
    lease_seconds: float = Field(60.0, gt=0, description="A job's lease; renewed by the heartbeat.")
    heartbeat_seconds: float = Field(10.0, gt=0)
    reap_every_seconds: float = Field(
        30.0, gt=0, description="How often a worker looks for orphans."
    )
    requeue_after_seconds: float = Field(
        3600.0,
        gt=0,
        description="A job still queued this long after its id was sent is re-sent "
        "(the message may have been lost); duplicates are harmless.",
    )
    visibility_timeout_seconds: int = Field(
        48 * 3600, ge=60, description="Broker redelivery timeout: above the longest job."
    )
    checkpoints_to_store: bool = Field(
        True,
        description="Copy each checkpoint to the artifact store, so a job can resume on "
        "another worker host (costs an upload per checkpoint).",
    )
    event_min_interval_seconds: float = Field(
        1.0,
        ge=0,
        description="Between the step grid's points (EVENT_MAX_STEP_POINTS), step events "
        "are throttled to one per interval (phase changes are not).",
    )
    event_max_step_points: int = Field(
        200,
        ge=1,
        description="Steps always written as events, evenly spaced: every step of a job "
        "with at most this many, so a short job's loss curve has each of its points.",
    )
    task_queue: str = "unlearn"
    worker_classes: dict[str, float] | None = Field(
        None,
        description='Classes of workers and their device memory in GB, e.g. {"l4": 24, '
        '"h100": 80} (JSON): each has its queue, served by `unlearn worker --class NAME`; '
        "jobs go to the smallest that fits (core.service.capacity). Unset: one queue.",
    )
    worker_class_gpus: dict[str, int] | None = Field(
        None,
        description='GPUs on each worker of a class, e.g. {"h100x8": 8} (JSON); a class not '
        "named has 1. A job with resources.gpus N goes to a class with at least N.",
    )
    worker_class: str | None = Field(
        None, description="The class this worker serves (set by `unlearn worker --class`)."
    )

    def queue_for(self, worker_class: str | None) -> str:
        """The queue of a worker class; the one queue where there are no classes."""
        return f"{self.task_queue}.{worker_class}" if worker_class else self.task_queue

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines: json, text, or auto (text on a terminal, else json)."
    )

    @field_validator("unlearn_data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("heartbeat_seconds")
    @classmethod
    def _heartbeat_below_lease(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("lease_seconds")
        if lease is not None and value >= lease:
            raise ValueError(f"heartbeat_seconds ({value}) must be below lease_seconds ({lease})")
        return value

    @field_validator("rate_limit", "read_rate_limit", "anonymous_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit ({exc}); e.g. '20/second;600/minute'") from None
        return value

    @property
    def rate_limit_storage(self) -> str:
        """Where rate-limit counters live: shared by every API process on the stack."""
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        if self.celery_broker_url.startswith(("redis://", "rediss://")):
            return self.celery_broker_url
        return "memory://"

    @property
    def embedded(self) -> bool:
        return self.database_url is None and self.broker_url is None

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.unlearn_data_dir / 'unlearn.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.unlearn_data_dir / 'broker.db'}"

    @property
    def broker_transport_options(self) -> dict[str, object]:
        """Redis redelivers an unacked message after the visibility timeout, so it must be
        above the longest job. The SQLite queue passes its options to create_engine and
        takes none."""
        if self.celery_broker_url.startswith(("redis", "rediss", "sqs")):
            return {"visibility_timeout": self.visibility_timeout_seconds}
        return {}

    @property
    def keyring_dir(self) -> Path:
        return self.signing_keys_dir or self.unlearn_data_dir / "signing-keys"

    @property
    def local_store(self) -> Path:
        return self.unlearn_data_dir / "store"

    @property
    def work_dir(self) -> Path:
        """Worker scratch: downloaded inputs, checkpoints, outputs before upload."""
        return self.unlearn_data_dir / "work"


@functools.lru_cache
def get_settings() -> Settings:
    return Settings()
