"""Status dashboards against a job that trains: the issue's figures in one run, on the
embedded default or the Postgres stack of this machine, the load on the same cores.

1. `--dashboards` open connections each poll `GET /v1/jobs/{id}` once a second, as the
   dashboard does (If-None-Match with the last ETag, so an unchanged job is a 304),
   while the job trains: latency p50/p99 and the share of 304s. The job's steps per
   second are measured in turns of `--seconds`: alone, with the dashboards, alone, ...
   (`--cycles` turns with them), and its mean speed with them set against its mean
   speed alone, so the job's drift from turn to turn lands on both sides.
2. `--streams` SSE streams (`/events/stream`) read the job's events as it trains, as
   open dashboards do: the job's speed with them in the same turns as in 1.
3. Closed loop, wrk (apt install wrk), 50 connections, on a second job that waits in
   the queue behind the first (so its answer does not change): the 200 path, then the
   304 path (If-None-Match of its ETag); requests per second and p99, the first job
   training meanwhile.
4. `--streams` idle SSE streams on the job: the API's resident memory before and while
   they are open, and (Postgres) the database connections.

The dashboards' client is a few lines of asyncio on raw keep-alive connections, so the
load generator costs little beside the server; latency is from the send to the last
byte of the answer.

    python benchmarks/bench_dashboards.py --stack embedded
    python benchmarks/bench_dashboards.py --stack postgres
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_fairness import cli  # noqa: E402
from tests.service.conftest import free_port, stop_process_group, wait_http  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pids_of(root: int) -> list[int]:
    """`root` and its descendants."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.is_file():
            todo.extend(int(c) for c in children.read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system, all threads) process `pid` has used (0 once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes_named(name: str) -> list[int]:
    """Every process whose command line holds `name` (pgrep -f)."""
    found = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def with_cpu(loaded, pids: dict[str, Callable[[], list[int]]], shares: list[dict[str, float]]):  # type: ignore[no-untyped-def]
    """`loaded`, also appending to `shares` the cores each group of processes used
    meanwhile (this process, the load generator, as "load generator"). Each group is
    listed before and after (a database's backends come and go): a process that ended
    meanwhile is not counted."""

    def measured(seconds: float):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        before = {name: {p: cpu_seconds(p) for p in group()} for name, group in pids.items()}
        generator = time.process_time()
        result = loaded(seconds)
        elapsed = time.monotonic() - started
        share = {
            name: sum(cpu_seconds(p) - before[name].get(p, 0.0) for p in group()) / elapsed
            for name, group in pids.items()
        }
        share["load generator"] = (time.process_time() - generator) / elapsed
        shares.append(share)
        return result

    return measured


def cores(shares: list[dict[str, float]]) -> str:
    """The mean cores each group used over the loaded turns, as a line."""
    return ", ".join(f"{name} {statistics.mean(s[name] for s in shares):.2f}" for name in shares[0])


# --- the dashboards -------------------------------------------------------------------


async def dashboard(
    port: int, path: str, key: str, first: float, until: float, out: list[tuple[float, int]]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    etag = None
    due = first
    try:
        while due < until:
            await asyncio.sleep(max(0.0, due - loop.time()))
            conditional = f"If-None-Match: {etag}\r\n" if etag else ""
            request = (
                f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
                f"{conditional}\r\n"
            )
            sent = time.perf_counter()
            try:
                writer.write(request.encode())
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = re.search(r"(?i)content-length:\s*(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
            except (asyncio.IncompleteReadError, ConnectionError):  # the server closed it
                out.append((time.perf_counter() - sent, 0))
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                due += 1.0
                continue
            out.append((time.perf_counter() - sent, int(head.split(" ", 2)[1])))
            tag = re.search(r"(?i)\betag:\s*(\S+)", head)
            etag = tag.group(1) if tag else etag
            due += 1.0
    finally:
        writer.close()


async def dashboards(
    port: int, path: str, key: str, count: int, seconds: float
) -> list[tuple[float, int]]:
    """(latency, status) of each poll of `count` dashboards over `seconds`."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    out: list[tuple[float, int]] = []
    await asyncio.gather(
        *(dashboard(port, path, key, start + i / count, start + seconds, out) for i in range(count))
    )
    return out


def summary(out: list[tuple[float, int]]) -> dict:
    latencies = sorted(latency for latency, _ in out)
    codes = [code for _, code in out]
    return {
        "requests": len(out),
        "not_modified": codes.count(304) / len(codes),
        "errors": sum(code not in (200, 304) for code in codes),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def wrk(url: str, key: str, seconds: float, etag: str | None) -> dict:
    command = ["wrk", "-t1", "-c50", f"-d{int(seconds)}s", "--latency"]
    command += ["-H", f"Authorization: Bearer {key}"]
    if etag:
        command += ["-H", f"If-None-Match: {etag}"]
    out = subprocess.run([*command, url], check=True, capture_output=True, text=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": ms("99%"),
    }


async def idle_streams(port: int, path: str, key: str, count: int) -> list:
    """`count` open SSE streams (the first bytes read, then left idle)."""
    opened = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        opened.append((reader, writer))
    return opened


async def following_streams(
    port: int, path: str, key: str, count: int, seconds: float, measure
) -> tuple[float, int]:
    """`count` SSE streams reading a training job's events as a dashboard does, for
    `seconds`: (what `measure` returned, meanwhile in a thread; events received)."""
    received = [0]

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        try:
            while line := await reader.readline():
                received[0] += line.startswith(b"id:")
        finally:
            writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.sleep(1.0)
    result = await asyncio.to_thread(measure, seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result, received[0]


def interleaved(loaded, alone, cycles: int, seconds: float, keep) -> tuple[str, float]:
    """The job's speed alone and under a load in turns, `cycles` times, then alone once
    more: (a line of the figures, the ratio of the mean loaded speed to the mean speed
    alone). Turns of the same length, side by side, so the job's drift between phases
    shows in both. `loaded(seconds)` returns (steps per second, what `keep` takes)."""
    quiet, busy = [alone(seconds)], []
    for _ in range(cycles):
        speed, kept = loaded(seconds)
        keep(kept)
        busy.append(speed)
        quiet.append(alone(seconds))
    ratio = statistics.mean(busy) / statistics.mean(quiet)
    turns = ", ".join(f"{b / ((quiet[i] + quiet[i + 1]) / 2):.2f}x" for i, b in enumerate(busy))
    line = (
        f"{statistics.mean(busy):.2f} steps/s under the load against {statistics.mean(quiet):.2f} "
        f"alone ({ratio:.2f}x; each turn against the alone turns beside it: {turns}; alone "
        f"{min(quiet):.2f}-{max(quiet):.2f})"
    )
    return line, ratio


def api_client(url: str, key: str, api: subprocess.Popen) -> httpx.Client:
    """A client of the API process `api` at `url` with `key`, once its /healthz answers."""
    wait_http(f"{url}/healthz", api)
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


# --- the run ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["embedded", "postgres"], default="embedded")
    parser.add_argument("--dashboards", type=int, default=200)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument(
        "--seconds", type=float, default=10, help="Each turn's length (and wrk's run)."
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=3,
        help="Turns of the job under each load, each between two turns of it alone.",
    )
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument(
        "--status-cache",
        type=float,
        nargs="+",
        default=[0.0, 1.0],
        help="STATUS_CACHE_SECONDS of each round (a fresh service each): default off, then on",
    )
    parser.add_argument(
        "--worker-threads",
        type=int,
        nargs="+",
        default=[0],
        help="WORKER_THREADS of each round (torch threads of the training job); 0 leaves "
        "it unset: the service's default (embedded: all cores but one; a separate worker: all)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="Pin the API process to the first core and the worker to the others (the "
        "load generator stays unpinned).",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt install wrk)")
    for threads in args.worker_threads:
        for seconds in args.status_cache:
            run(args, seconds, threads)


def run(args: argparse.Namespace, status_cache: float, threads: int) -> None:

    from sqlalchemy import create_engine, text

    from core.demo.build import build_model

    state = Path(tempfile.mkdtemp(prefix="bench-dashboards-"))
    env = {
        **os.environ,
        "UNLEARN_DATA_DIR": str(state),
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT": "100000/second",  # the server is measured, not its limits
        "MAX_CONNECTIONS": "2000",
        "MAX_JOB_TOKENS": str(10**12),
        "WORKER_DEVICE": "cpu",
        "STATUS_CACHE_SECONDS": str(status_cache),
    }
    env.pop("WORKER_THREADS", None)
    if threads:
        env["WORKER_THREADS"] = str(threads)
    admin = None
    name = f"unlearn_dash_{uuid.uuid4().hex[:6]}"
    if args.stack == "postgres":
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        env.update(
            DATABASE_URL=args.pg.rsplit("/", 1)[0] + f"/{name}",
            BROKER_URL=args.redis,
            TASK_QUEUE=f"bench-dash-{name}",
        )
    processes: list[subprocess.Popen] = []
    try:
        build_model(state / "fixture", "fixture", seed=0)
        cli(env, "migrate")
        cli(env, "models", "add", "tiny", str(state / "fixture" / "model"))
        key = cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
        port = free_port()
        serve = [sys.executable, "-m", "api", "serve", "--port", str(port)]
        if args.stack == "postgres":
            serve.append("--no-with-worker")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "api", "worker"],
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                )
            )
        api = subprocess.Popen(serve, env=env, cwd=ROOT, start_new_session=True)
        processes.append(api)
        url = f"http://127.0.0.1:{port}"
        http = api_client(url, key, api)
        forget = state / "fixture" / "data" / "forget_qa.jsonl"
        with forget.open("rb") as handle:
            file_id = http.post(
                "/v1/files", data={"purpose": "forget"}, files={"file": handle}
            ).json()["id"]
        job = http.post(
            "/v1/jobs",
            json={
                "method": "catnip",
                "base_model": "tiny",
                "forget_file": file_id,
                "hyperparameters": {"max_steps": 90_000, "learning_rate": 1e-6, "max_length": 64},
            },
        ).json()
        path = f"/v1/jobs/{job['id']}"

        def step() -> tuple[float, int]:
            return time.monotonic(), http.get(path).json()["progress"]["step"]

        deadline = time.monotonic() + 120
        while step()[1] < 5:
            if time.monotonic() > deadline:
                raise SystemExit("the job did not start training within 120 s")
            time.sleep(0.5)

        def alone(seconds: float = args.seconds) -> float:
            (t0, s0) = step()
            time.sleep(seconds)
            (t1, s1) = step()
            return (s1 - s0) / (t1 - t0)

        print(
            f"{args.stack}, STATUS_CACHE_SECONDS={status_cache:g}, WORKER_THREADS={threads or 'default'}: "
            f"{args.dashboards} dashboards, "
            f"1 poll/s each, for {args.seconds:.0f} s"
        )

        def polled(seconds: float) -> tuple[float, list[tuple[float, int]]]:
            t0, s0 = step()
            out = asyncio.run(dashboards(port, path, key, args.dashboards, seconds))
            t1, s1 = step()
            return (s1 - s0) / (t1 - t0), out

        def followed(seconds: float) -> tuple[float, int]:
            return asyncio.run(
                following_streams(port, path + "/events/stream", key, args.streams, seconds, alone)
            )

        # the API's own process (its threads), and the training: the embedded worker is
        # the API's child, the stack's worker a process of its own (and its children)
        trainer = pids_of(processes[0].pid) if args.stack == "postgres" else pids_of(api.pid)[1:]
        groups = {"API": lambda: [api.pid], "worker": lambda: trainer}
        if args.stack == "postgres":  # the servers the stack's requests and events go through
            groups |= {
                "Postgres": lambda: processes_named("postgres"),
                "Redis": lambda: processes_named("redis-server"),
            }
        if args.pin:  # the API's threads on the first core, the worker's on the others
            cpus = sorted(os.sched_getaffinity(0))
            for pids, where in (([api.pid], cpus[:1]), (trainer, cpus[1:])):
                for pid in pids:
                    for task in Path(f"/proc/{pid}/task").iterdir():
                        os.sched_setaffinity(int(task.name), where)
        polls: list[tuple[float, int]] = []
        shares: list[dict[str, float]] = []
        polled = with_cpu(polled, groups, shares)
        line, _ = interleaved(polled, alone, args.cycles, args.seconds, polls.extend)
        measured = summary(polls)
        print(
            f"  dashboards: {measured['requests']} requests, {measured['not_modified']:.0%} 304, "
            f"{measured['errors']} errors, p50 {measured['p50_ms']:.1f} ms, "
            f"p99 {measured['p99_ms']:.1f} ms"
        )
        print(f"  training with the dashboards: {line}")
        print(f"  cores used meanwhile: {cores(shares)}")
        events: list[int] = []
        shares.clear()
        followed = with_cpu(followed, groups, shares)
        line, _ = interleaved(followed, alone, args.cycles, args.seconds, events.append)
        print(
            f"  {args.streams} SSE streams following the job: training {line}, "
            f"{sum(events)} events received"
        )
        print(f"  cores used meanwhile: {cores(shares)}")
        waiting = http.post(
            "/v1/jobs", json={"method": "catnip", "base_model": "tiny", "forget_file": file_id}
        ).json()
        queued = f"/v1/jobs/{waiting['id']}"
        assert http.get(queued).json()["status"] == "queued"
        full = wrk(url + queued, key, args.seconds, None)
        etag = http.get(queued).headers["etag"]
        cached = wrk(url + queued, key, args.seconds, etag)
        assert http.get(queued).json()["status"] == "queued"  # unchanged throughout
        print(
            f"  wrk, 50 connections: 200 path {full['rps']:.0f} req/s (p99 {full['p99_ms']:.0f} "
            f"ms); 304 path {cached['rps']:.0f} req/s (p99 {cached['p99_ms']:.0f} ms)"
        )
        api_pids = pids_of(api.pid)
        before = sum(rss_bytes(p) for p in api_pids)

        async def hold() -> tuple[int, int | None]:
            opened = await idle_streams(port, path + "/events/stream", key, args.streams)
            await asyncio.sleep(5)
            rss = sum(rss_bytes(p) for p in api_pids)
            connections = None
            if admin is not None:
                with admin.connect() as conn:
                    connections = conn.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE datname = :n"),
                        {"n": name},
                    ).scalar_one()
            for _, writer in opened:
                writer.close()
            return rss, connections

        during, connections = asyncio.run(hold())
        print(
            f"  {args.streams} idle SSE streams: API processes' RSS {before / 2**20:.0f} -> "
            f"{during / 2**20:.0f} MiB ({(during - before) / args.streams / 1024:.0f} KiB each)"
            + (f"; database connections {connections}" if connections is not None else "")
        )
        http.post(f"{path}/cancel")
        http.post(f"{queued}/cancel")
    finally:
        for process in processes:
            stop_process_group(process)
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
