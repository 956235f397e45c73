"""A tenant's dashboards polling its job once a second, with the default rate limits.

The embedded service (`unlearn serve --no-with-worker`, no RATE_LIMIT or READ_RATE_LIMIT
set: the defaults), one tenant, one queued job; `--pollers` clients, each on its own
keep-alive connection, send `GET /v1/jobs/{id}` once a second with the ETag they last
saw (If-None-Match: a 304 when nothing changed) for `--seconds`; then the same tenant
sends 40 writes at once (cancel requests). The statuses of each, and the polls' p50/p99.

    .venv/bin/python benchmarks/bench_pollers.py [--pollers 200 --seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_dashboards import api_client  # noqa: E402
from benchmarks.bench_fairness import cli, queued_job, serve_api  # noqa: E402
from tests.service.conftest import stop_process_group  # noqa: E402


async def poll(url: str, key: str, path: str, seconds: float, offset: float) -> list:
    """One dashboard: (status, latency) of a poll a second."""
    out = []
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        await asyncio.sleep(offset)
        etag = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = await client.get(path, headers={"If-None-Match": etag} if etag else {})
            out.append((response.status_code, time.monotonic() - started))
            etag = response.headers.get("etag", etag)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return out


async def load(url: str, key: str, path: str, args: argparse.Namespace) -> None:
    polls = await asyncio.gather(
        *(poll(url, key, path, args.seconds, i / args.pollers) for i in range(args.pollers))
    )
    results = [r for one in polls for r in one]
    statuses = collections.Counter(status for status, _ in results)
    latency = sorted(seconds for _, seconds in results)
    print(
        f"{args.pollers} pollers at 1/s for {args.seconds:g} s: {len(results)} polls, "
        f"statuses {dict(statuses)}, p50 {latency[len(latency) // 2] * 1000:.1f} ms, "
        f"p99 {latency[int(len(latency) * 0.99)] * 1000:.1f} ms",
        flush=True,
    )
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        writes = await asyncio.gather(*(client.post(f"{path}/cancel") for _ in range(40)))
    print(f"40 writes at once: statuses {dict(collections.Counter(r.status_code for r in writes))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-pollers-"))
    env = {**os.environ, "UNLEARN_DATA_DIR": str(state), "LOG_LEVEL": "ERROR"}
    for name in ("RATE_LIMIT", "READ_RATE_LIMIT"):
        env.pop(name, None)
    api = None
    try:
        from core.demo.build import build_model

        build_model(state / "fixture", "fixture", seed=0)
        cli(env, "migrate")
        cli(env, "models", "add", "tiny", str(state / "fixture" / "model"))
        key = cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
        api, url = serve_api(env)
        job = queued_job(api_client(url, key, api), state / "fixture")
        asyncio.run(load(url, key, f"/v1/jobs/{job['id']}", args))
    finally:
        if api is not None:
            stop_process_group(api)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
