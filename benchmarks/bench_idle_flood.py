"""One client's idle connections against the API: what a tenant's requests see.

The embedded service (`unlearn serve --no-with-worker`, its own process, the server's
own options: MAX_CONNECTIONS 1000, HEADER_TIMEOUT_SECONDS 10); `--connections` sockets
from 127.0.0.2, each a request line and half its headers, reconnecting at once whenever
the server closes it (tests.service.conftest.IdleFlood); meanwhile a tenant on 127.0.0.1
sends `GET /v1/jobs` with its key every 20 ms for `--seconds`. For each
MAX_CONNECTIONS_PER_CLIENT in `--per-client` (0: no cap), a fresh service: the tenant's
statuses, their latency p50/p99, the connections the flood opened per second and the API
process's cores.

    .venv/bin/python benchmarks/bench_idle_flood.py [--per-client 256 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_dashboards import api_client, pids_of  # noqa: E402
from benchmarks.bench_fairness import cli, serve_api  # noqa: E402
from benchmarks.bench_request_cpu import cpu_seconds  # noqa: E402
from tests.service.conftest import IdleFlood, stop_process_group  # noqa: E402


def run(args: argparse.Namespace, per_client: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="bench-idle-flood-"))
    env = {
        **os.environ,
        "UNLEARN_DATA_DIR": str(state),
        "LOG_LEVEL": "ERROR",
        "RATE_LIMIT": "100000/second",
        "MAX_CONNECTIONS_PER_CLIENT": str(per_client),
    }
    api = None
    try:
        cli(env, "migrate")
        key = cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
        api, url = serve_api(env, stderr=subprocess.DEVNULL)
        port = int(url.rsplit(":", 1)[1])
        http = api_client(url, key, api)
        assert http.get("/v1/jobs").status_code == 200
        statuses: collections.Counter[int] = collections.Counter()
        seconds: list[float] = []
        with IdleFlood(port, args.connections) as flood:
            flood.wait_sent()
            opened, cpu, begun = flood.opened, cpu_seconds(pids_of(api.pid)), time.monotonic()
            while time.monotonic() - begun < args.seconds:
                started = time.monotonic()
                statuses[http.get("/v1/jobs").status_code] += 1
                seconds.append(time.monotonic() - started)
                time.sleep(0.02)
            elapsed = time.monotonic() - begun
            opened, cpu = flood.opened - opened, cpu_seconds(pids_of(api.pid)) - cpu
        seconds.sort()
        print(
            f"MAX_CONNECTIONS_PER_CLIENT={per_client}: {len(seconds)} tenant requests, "
            f"statuses {dict(statuses)}, p50 {seconds[len(seconds) // 2] * 1000:.1f} ms, "
            f"p99 {seconds[int(len(seconds) * 0.99)] * 1000:.1f} ms; the flood opened "
            f"{opened / elapsed:,.0f} connections/s; API {cpu / elapsed:.2f} cores",
            flush=True,
        )
    finally:
        if api is not None:
            stop_process_group(api)
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-client", type=int, nargs="+", default=[256, 0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    for per_client in parser.parse_args().per_client:
        run(parser.parse_args(), per_client)


if __name__ == "__main__":
    main()
