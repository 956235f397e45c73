"""Every database query the API and the workers make, in one place.

Functions take a Session and do not commit: commits happen at the boundary (the
request dependency, the worker's task wrapper). Every read of a tenant's data is
scoped by tenant; another tenant's ids are simply not found.

One module per area; this package re-exports them all, so callers write
`from core.service import repo` and `repo.get_job(...)`.
"""

from __future__ import annotations

from core.service.repo.artifacts import get_artifact, list_artifacts, replace_artifacts
from core.service.repo.audit import list_audit
from core.service.repo.common import metadata_filters, page, ping
from core.service.repo.events import add_event, last_event_number, list_events
from core.service.repo.files import (
    delete_file,
    file_in_use,
    file_validated,
    files_by_id,
    get_file,
    list_files,
    lock_files,
    set_file_report,
    stored_bytes,
)
from core.service.repo.jobs import (
    active_jobs,
    add_job_files,
    cancel_requested,
    find_idempotent,
    find_job,
    get_job,
    job_file_slots,
    jobs_by_id,
    list_jobs,
    request_cancel,
    request_hash,
)
from core.service.repo.keys import (
    KEY_PREFIX,
    caller_for_key_hash,
    create_key,
    hash_key,
    list_keys,
    revoke_key,
)
from core.service.repo.lease import (
    acquire_lease,
    finish_job,
    lost_queued_jobs,
    orphaned_jobs,
    renew_lease,
)
from core.service.repo.models import (
    MODEL_NAME,
    add_model,
    find_model,
    get_model,
    list_models,
    reference_for,
)
from core.service.repo.tenants import TENANT_NAME, get_tenant, list_tenants, lock_tenant

__all__ = [
    "KEY_PREFIX",
    "MODEL_NAME",
    "TENANT_NAME",
    "acquire_lease",
    "active_jobs",
    "add_event",
    "add_job_files",
    "add_model",
    "caller_for_key_hash",
    "cancel_requested",
    "create_key",
    "delete_file",
    "file_in_use",
    "file_validated",
    "files_by_id",
    "find_idempotent",
    "find_job",
    "find_model",
    "finish_job",
    "get_artifact",
    "get_file",
    "get_job",
    "get_model",
    "get_tenant",
    "hash_key",
    "job_file_slots",
    "jobs_by_id",
    "last_event_number",
    "list_artifacts",
    "list_audit",
    "list_events",
    "list_files",
    "list_jobs",
    "list_keys",
    "list_models",
    "list_tenants",
    "lock_files",
    "lock_tenant",
    "lost_queued_jobs",
    "metadata_filters",
    "orphaned_jobs",
    "page",
    "ping",
    "reference_for",
    "renew_lease",
    "replace_artifacts",
    "request_cancel",
    "request_hash",
    "revoke_key",
    "set_file_report",
    "stored_bytes",
]
