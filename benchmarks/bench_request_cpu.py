"""What one status poll costs in CPU on the Postgres stack: the API process, Redis (the
rate limit's counters) and Postgres, per request answered.

The API alone (`unlearn serve --no-with-worker`, so nothing trains), one queued job;
wrk, 50 connections, polls its `GET /v1/jobs/{id}` for `--seconds`, on the 304 path
(If-None-Match of its ETag) and then the 200 path; the CPU seconds of each process from
/proc before and after, over the requests answered. `--rate-limit-storage redis`
keeps the rate limit's counters in Redis (the stack's default), `memory` in the API
process (`RATE_LIMIT_STORAGE_URL=memory://`, not shared between API processes); each a
fresh service and database, in the order given.

    .venv/bin/python benchmarks/bench_request_cpu.py [--rate-limit-storage redis memory]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_dashboards import api_client, pids_of, processes_named, wrk  # noqa: E402
from benchmarks.bench_fairness import cli, queued_job, serve_api  # noqa: E402
from tests.service.conftest import stop_process_group  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace, storage: str, model: Path) -> None:
    from sqlalchemy import create_engine, text

    state = Path(tempfile.mkdtemp(prefix="bench-request-cpu-"))
    name = f"unlearn_cpu_{uuid.uuid4().hex[:6]}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    env = {
        **os.environ,
        "UNLEARN_DATA_DIR": str(state),
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT": "100000/second",  # one limit that never refuses: its cost is measured
        "MAX_CONNECTIONS": "2000",
        "STATUS_CACHE_SECONDS": "1",
        "DATABASE_URL": args.pg.rsplit("/", 1)[0] + f"/{name}",
        "BROKER_URL": args.redis,
        "TASK_QUEUE": f"bench-cpu-{name}",
    }
    if storage == "memory":
        env["RATE_LIMIT_STORAGE_URL"] = "memory://"
    api = None
    try:
        cli(env, "migrate")
        cli(env, "models", "add", "tiny", str(model / "model"))
        key = cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
        api, url = serve_api(env)
        http = api_client(url, key, api)
        job = queued_job(http, model)
        path = f"/v1/jobs/{job['id']}"
        etag = http.get(path).headers["etag"]
        measured = {
            "API": pids_of(api.pid),
            "Redis": processes_named("redis-server"),
            "Postgres": processes_named("postgres"),
        }
        for label, tag in (("304", etag), ("200", None)):
            before = {what: cpu_seconds(pids) for what, pids in measured.items()}
            result = wrk(f"{url}{path}", key, args.seconds, tag)
            after = {what: cpu_seconds(pids) for what, pids in measured.items()}
            answered = result["rps"] * args.seconds
            per_request = ", ".join(
                f"{what} {1e6 * (after[what] - before[what]) / answered:.0f} us"
                for what in measured
            )
            print(
                f"rate limit in {storage}, {label} path: {result['rps']:,.0f} req/s, "
                f"CPU per request: {per_request}",
                flush=True,
            )
    finally:
        if api is not None:
            stop_process_group(api)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rate-limit-storage", nargs="+", choices=["redis", "memory"], default=["redis", "memory"]
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt install wrk)")
    from core.demo.build import build_model

    with tempfile.TemporaryDirectory(prefix="bench-request-cpu-model-") as directory:
        model = Path(directory) / "fixture"
        build_model(model, "fixture", seed=0)
        for storage in args.rate_limit_storage:
            run(args, storage, model)


if __name__ == "__main__":
    main()
