"""GET /v1/jobs/{id} under 50 concurrent pollers, against the Postgres stack on this machine.

Starts the API (uvicorn, N worker processes) on Postgres + Redis, creates a tenant, a file
and a job, then runs `--pollers` concurrent clients (asyncio + httpx, one process) for
`--seconds`, and prints latency p50/p99 and requests per second. The client shares the
machine's cores with the server, so the figures are a floor, not a ceiling.

    .venv/bin/python benchmarks/bench_api.py --pollers 50 --seconds 20 --api-workers 1
    .venv/bin/python benchmarks/bench_api.py --client wrk   # wrk (apt install wrk) as the client

`--client both` runs the two clients one after the other against the same server: the
Python client costs about as much CPU per request as the server, so wrk (C, one thread)
shows more of what the server itself can do on the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def poll(
    client: httpx.AsyncClient, path: str, until: float, latencies: list[float], errors: list[int]
) -> None:
    while time.perf_counter() < until:
        started = time.perf_counter()
        response = await client.get(path)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            errors.append(response.status_code)


async def run_pollers(url: str, key: str, job_id: str, pollers: int, seconds: float) -> dict:
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    latencies: list[float] = []
    errors: list[int] = []
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        await client.get(f"/v1/jobs/{job_id}")  # warm
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(
            *(poll(client, f"/v1/jobs/{job_id}", until, latencies, errors) for _ in range(pollers))
        )
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def run_wrk(url: str, key: str, job_id: str, pollers: int, seconds: float) -> dict:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{pollers}",
            f"-d{int(seconds)}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {key}",
            f"{url}/v1/jobs/{job_id}",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "errors": int(errors.group(1)) if errors else 0,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--client", choices=["python", "wrk", "both"], default="python")
    parser.add_argument(
        "--profile",
        metavar="OUT",
        help="sample the server with py-spy (pip install py-spy) while the clients run; "
        "write collapsed stacks to OUT",
    )
    args = parser.parse_args()

    name = f"unlearn_bench_{uuid.uuid4().hex[:6]}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = args.pg.rsplit("/", 1)[0] + f"/{name}"
    state = Path(tempfile.mkdtemp(prefix="bench-api-"))
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "BROKER_URL": args.redis,
        "UNLEARN_DATA_DIR": str(state),
        "TASK_QUEUE": "bench-api",
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT": "100000/second",  # one tenant's 50 pollers: the server is measured, not its limit
    }
    server = None

    def run(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "api", *args],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    try:
        run("migrate")
        key = run("keys", "create", "--tenant", "bench").strip().splitlines()[-1]
        model_dir = state / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")  # registered only; no job runs here
        run("models", "add", "bench-model", str(model_dir))
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:app",
                "--port",
                str(port),
                "--workers",
                str(args.api_workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the API did not come up")
            time.sleep(0.1)
        headers = {"Authorization": f"Bearer {key}"}
        file_id = httpx.post(
            f"{url}/v1/files",
            headers=headers,
            data={"purpose": "forget"},
            files={"file": ("f.jsonl", b'{"prompt": "q", "response": "a"}\n')},
        ).json()["id"]
        job = httpx.post(
            f"{url}/v1/jobs",
            headers=headers,
            json={"method": "catnip", "base_model": "bench-model", "forget_file": file_id},
        ).json()
        print(
            f"GET /v1/jobs/{{id}}: {args.pollers} concurrent pollers, {args.seconds:.0f} s, "
            f"{args.api_workers} uvicorn worker(s), Postgres + Redis"
        )
        with httpx.Client(base_url=url, headers=headers) as one:
            for path in (f"/v1/jobs/{job['id']}", "/healthz"):
                one.get(path)
                started = time.perf_counter()
                for _ in range(300):
                    one.get(path)
                print(
                    f"  one client, sequential: {path.split('/')[-1] if 'job' in path else path} "
                    f"{(time.perf_counter() - started) / 300 * 1000:.1f} ms per request"
                )
        clients = ["python", "wrk"] if args.client == "both" else [args.client]
        for client in clients:
            if client == "wrk" and shutil.which("wrk") is None:
                raise SystemExit("wrk is not installed (apt install wrk)")
            runner = run_wrk if client == "wrk" else lambda *a: asyncio.run(run_pollers(*a))
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(server.pid), "--format", "raw"]
                    + ["--duration", str(int(args.seconds)), "--rate", "250", "-o", args.profile],
                    stdout=subprocess.DEVNULL,
                )
            result = runner(url, key, job["id"], args.pollers, args.seconds)
            if profiler is not None:
                profiler.wait(60)
            print(
                f"  {client:6s} client: requests {result['requests']}, errors {result['errors']}, "
                f"throughput {result['rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms"
            )
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
