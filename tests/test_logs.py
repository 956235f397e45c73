"""The service's log lines: JSON or text, with the context's request, tenant, key and job."""

from __future__ import annotations

import io
import json
import logging

from core.service import logs


def test_records_carry_the_context_they_were_made_in():
    stream = io.StringIO()
    handler = logs.configure("INFO", "json", stream=stream)
    try:
        log = logging.getLogger("worker.something")
        with logs.bound(request_id="req-1", tenant="acme"):
            logs.bind(job_id="job-1")
            log.info("inside %s", "the job")
        log.info("outside")
        logging.getLogger("some.library").info("a library's info is below WARNING")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2, lines
    inside, outside = lines
    assert inside["message"] == "inside the job" and inside["logger"] == "worker.something"
    assert (inside["request_id"], inside["tenant"], inside["job_id"]) == ("req-1", "acme", "job-1")
    assert inside["level"] == "INFO" and "time" in inside
    assert not {"request_id", "tenant", "job_id"} & set(outside)


def test_text_lines_for_a_terminal_and_one_handler_however_often_configured():
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=io.StringIO())
    handler = logs.configure("INFO", "text", stream=stream)
    try:
        assert [h for h in logging.getLogger().handlers if getattr(h, "_unlearn", False)] == [
            handler
        ]
        with logs.bound(job_id="job-2"):
            logging.getLogger("api.access").info("GET /v1/jobs 200")
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.endswith("api.access: GET /v1/jobs 200 job_id=job-2"), line
