"""A job's distillation set is checked against its forget set at submission: records
that repeat forget data are refused (422, naming the lines), before the job exists."""

from __future__ import annotations

import tempfile
from pathlib import Path

from core.engine.formats import load_records
from core.engine.robust.overlap import check_distill_set
from core.engine.spec.parts import TRAIN_FILE_KINDS
from core.errors import DataError, SpecError
from core.service.db import File
from core.service.storage import Store


def _local(store: Store, row: File, directory: Path) -> Path:
    """The file's content as a local path: the local store's own, else a copy."""
    local = store.local_path(row.storage_key)
    if local is not None:
        return local
    path = directory / row.id
    store.get(row.storage_key, path)
    return path


def check_distill_file(store: Store, forget: File, distill: File) -> None:
    """SpecError (422, code distill_overlaps_forget) naming the distill_file lines that
    repeat forget_file records (core.engine.robust.overlap)."""
    with tempfile.TemporaryDirectory(prefix="unlearn-distill-check-") as work:
        forget_records = load_records(
            _local(store, forget, Path(work)), allowed_kinds=TRAIN_FILE_KINDS
        )
        distill_records = load_records(
            _local(store, distill, Path(work)), allowed_kinds=TRAIN_FILE_KINDS
        )
        try:
            check_distill_set(forget_records, distill_records)
        except DataError as exc:
            raise SpecError(
                exc.message, param="distill_file", code="distill_overlaps_forget"
            ) from None
