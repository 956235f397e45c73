"""One tenant floods, another works: the second tenant's poll latency and the time until
its job starts, with the per-tenant limits on and, side by side in the same run, with
them off (the service as it was: no rate limit, no cap on a tenant's active jobs).

The embedded service (`unlearn serve`: API + one worker, SQLite) on the test fixture
model. Each round:
  - the noisy tenant submits jobs until it is refused (or `--flood-jobs` of them), and
    8 threads of it request GET /v1/jobs as fast as they can;
  - the quiet tenant then submits one job and polls it every 0.2 s until it runs;
  - reported: the quiet tenant's poll latency (p50/p99), the noisy tenant's requests
    and how many were refused (429), and how long the quiet job waited to start.
The bound with the limits on: a job waits behind at most MAX_ACTIVE_JOBS jobs of each
other tenant (the queue is FIFO, and no tenant has more than that queued or running),
so with one worker it starts within MAX_ACTIVE_JOBS x (one job's time).

    .venv/bin/python benchmarks/bench_fairness.py [--flood-jobs 16] [--seconds-per-job ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service.conftest import free_port  # noqa: E402


def cli(env: dict, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "api", *args],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def serve_api(env: dict, **popen: object) -> tuple[subprocess.Popen, str]:
    """`unlearn serve --no-with-worker` on a free port, in a session of its own (stop it
    with tests.service.conftest.stop_process_group): the process and its URL."""
    from tests.service.conftest import free_port

    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port), "--no-with-worker"],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        **popen,
    )
    return api, f"http://127.0.0.1:{port}"


def queued_job(http: httpx.Client, model: Path) -> dict:
    """A CATNIP job on the fixture model `tiny`, its forget set uploaded from `model`."""
    with (model / "data" / "forget_qa.jsonl").open("rb") as handle:
        file_id = http.post("/v1/files", data={"purpose": "forget"}, files={"file": handle}).json()[
            "id"
        ]
    return http.post(
        "/v1/jobs", json={"method": "catnip", "base_model": "tiny", "forget_file": file_id}
    ).json()


def upload(client: httpx.Client, path: Path) -> str:
    with path.open("rb") as handle:
        response = client.post(
            "/v1/files", data={"purpose": "forget"}, files={"file": (path.name, handle)}
        )
    response.raise_for_status()
    return response.json()["id"]


def job_body(forget: str) -> dict:
    return {
        "method": "catnip",
        "base_model": "tiny",
        "forget_file": forget,
        "adapter": {"type": "lora", "r": 4},
        "hyperparameters": {"max_steps": 3, "batch_size": 8, "max_length": 32},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def round_(limits_on: bool, model_dir: Path, data: Path, flood_jobs: int) -> dict:
    state = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    env = {
        **os.environ,
        "UNLEARN_DATA_DIR": str(state),
        "LOG_LEVEL": "WARNING",
        "EVENT_MIN_INTERVAL_SECONDS": "0.5",
    }
    if limits_on:
        env |= {"MAX_ACTIVE_JOBS": "4", "RATE_LIMIT": "20/second;600/minute"}
    else:
        env |= {"MAX_ACTIVE_JOBS": "100000", "RATE_LIMIT": "100000/second"}
    cli(env, "models", "add", "tiny", str(model_dir))
    noisy = cli(env, "keys", "create", "--tenant", "noisy").strip().splitlines()[-1]
    quiet = cli(env, "keys", "create", "--tenant", "quiet").strip().splitlines()[-1]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.3)
        noisy_client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {noisy}"}, timeout=60
        )
        quiet_client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {quiet}"}, timeout=60
        )
        forget = upload(noisy_client, data / "forget_qa.jsonl")
        submitted, refused_jobs = 0, 0
        for _ in range(flood_jobs):
            answer = noisy_client.post("/v1/jobs", json=job_body(forget))
            if answer.status_code == 201:
                submitted += 1
            else:
                refused_jobs += 1
        stop = threading.Event()
        flood = {"requests": 0, "refused": 0}

        def hammer() -> None:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {noisy}"}, timeout=60
            ) as c:
                while not stop.is_set():
                    status = c.get("/v1/jobs").status_code
                    flood["requests"] += 1
                    flood["refused"] += status == 429

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        quiet_forget = upload(quiet_client, data / "forget_qa.jsonl")
        submitted_at = time.monotonic()
        job = quiet_client.post("/v1/jobs", json=job_body(quiet_forget)).json()
        latencies, waited = [], None
        while time.monotonic() - submitted_at < 900:
            started = time.perf_counter()
            status = quiet_client.get(f"/v1/jobs/{job['id']}").json()["status"]
            latencies.append(time.perf_counter() - started)
            if status != "queued":
                waited = time.monotonic() - submitted_at
                break
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(30)
        return {
            "limits": "on (4 active jobs, 20/s)" if limits_on else "off",
            "noisy_jobs_queued": submitted,
            "noisy_jobs_refused": refused_jobs,
            "flood_requests": flood["requests"],
            "flood_refused_429": flood["refused"],
            "quiet_polls": len(latencies),
            "quiet_poll_p50_ms": round(1000 * statistics.median(latencies), 1),
            "quiet_poll_p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "quiet_job_started_after_s": None if waited is None else round(waited, 1),
        }
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flood-jobs", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    from core.demo.build import build_model

    fixture = Path(tempfile.mkdtemp(prefix="bench-fair-model-"))
    build_model(fixture, "fixture", 0)
    results = [
        round_(True, fixture / "model", fixture / "data", args.flood_jobs),
        round_(False, fixture / "model", fixture / "data", args.flood_jobs),
    ]
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(fixture, ignore_errors=True)


if __name__ == "__main__":
    main()
