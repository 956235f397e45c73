"""What the deployment files promise, checked without a container engine (the images are
built and the stack run in tests/service/test_stack.py): the API runs without torch (the
slim image), and the compose file has the stack the README's Deployment section
describes: Postgres, Redis, MinIO, a one-shot `unlearn migrate` that the API and the GPU
worker wait for, and the two images; the local override replaces every public image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_and_job_validation_work_without_torch(tmp_path):
    # torch, transformers and peft made unimportable, as in docker/api.Dockerfile.
    script = f"""
import sys
for name in ("torch", "transformers", "peft", "accelerate", "lm_eval"):
    sys.modules[name] = None
from fastapi.testclient import TestClient
from api.app import create_app
from core.service.settings import Settings
from core.engine.spec import parse_spec
from core.errors import SpecError
from core.engine.evaluation.summary import forget_standing  # a job object with metrics
app = create_app(Settings(unlearn_data_dir={str(tmp_path)!r}))
assert TestClient(app).get("/healthz").json() == {{"status": "ok"}}
assert "JobCreate" in app.openapi()["components"]["schemas"]
spec = parse_spec({{"method": "npo", "base_model": "m", "forget_file": "f"}})
assert spec.hyperparameters.beta == 0.05
try:
    parse_spec({{"method": "nope", "base_model": "m", "forget_file": "f"}})
except SpecError as exc:
    assert "valid methods" in exc.message
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_compose_has_the_production_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "minio", "migrate", "api", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["unlearn", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    env = compose["x-env"]
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and env["BROKER_URL"].startswith(
        "redis://"
    )
    assert env["S3_ENDPOINT_URL"] == "http://minio:9000"
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert "COPY migrations migrations" in text and "USER unlearn" in text
    # Each image installs its extra from pyproject.toml, dependencies in a layer of their
    # own (copied before the source), and the API image's extra holds no ML package.
    for dockerfile, extra in (("api.Dockerfile", "api"), ("worker.Dockerfile", "worker")):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert f'-c constraints.txt ".[{extra}]"' in text
        assert text.index("COPY pyproject.toml") < text.index("COPY core core")
        # Built anywhere: the base and the package source are build arguments.
        assert "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE}" in text
        assert '${WHEELHOUSE_URL:+--no-index --find-links "$WHEELHOUSE_URL"}' in text
        assert "org.opencontainers.image.revision" in text and "HEALTHCHECK" in text
    api = {_name(r) for r in _project()["optional-dependencies"]["api"]}
    assert "fastapi" in api and not {"torch", "transformers", "peft", "lm-eval"} & api
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", ".unlearn"} <= set(ignored)


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return canonicalize_name(Requirement(requirement).name)


def _installed_closure(requirements: list[str], extras: set[str] = frozenset()) -> set[str]:
    """The distributions `requirements` bring in, transitively, as installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [(Requirement(r), extras) for r in requirements]
    seen: set[str] = set()
    while todo:
        requirement, active = todo.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": e}) for e in (active or {""})
        ):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [(Requirement(r), set(requirement.extras)) for r in requires]
    return seen


def _declared(*extras: str) -> set[str]:
    project = _project()
    requirements = list(project["dependencies"])
    todo = list(extras)
    while todo:
        for requirement in project["optional-dependencies"][todo.pop()]:
            if _name(requirement) == "unlearn-service":  # an extra that includes others
                from packaging.requirements import Requirement

                todo += Requirement(requirement).extras
            else:
                requirements.append(requirement)
    return _installed_closure(requirements)


ROLES = {
    # the client and the tenant CLI: no extra
    (): "import api.client, api.cli.tenant, api.cli\n"
    "from typer.testing import CliRunner\n"
    "assert CliRunner().invoke(api.cli.app, ['jobs', '--help']).exit_code == 0\n",
    # the API image: the app, its migrations, the operator's commands
    ("api",): "from fastapi.testclient import TestClient\n"
    "from api.app import create_app\n"
    "from core.service.settings import Settings\n"
    "import api.cli, api.server, core.service.migrate, core.service.signing\n"
    "app = create_app(Settings(unlearn_data_dir=sys.argv[1]))\n"
    "assert TestClient(app).get('/healthz').status_code == 200\n"
    "assert TestClient(app).get('/metrics').status_code == 200\n",
    # the worker image, `unlearn run`, `unlearn demo`: the engine, every stage
    ("worker",): "import worker.tasks, worker.runner, core.engine.pipeline, core.demo.bench\n"
    "import core.engine.evaluation.metrics, core.engine.report, core.engine.evaluation.evidence\n"
    "import core.engine.evaluation.robustness, core.engine.evaluation.privacy, core.engine.losses.backend\n",
}

# Run in a fresh interpreter: it records each package the project's own modules import
# while `code` runs (imports a library makes of its own optional extras are the
# library's business), then prints each with the distributions that provide it.
SPY = """
import sys, json
OURS = ("api", "core", "worker", "migrations")
wanted = set()
class Spy:
    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame and frame.f_globals.get("__name__", "").startswith(
            ("importlib", "_frozen_importlib")
        ):
            frame = frame.f_back
        caller = frame.f_globals.get("__name__", "") if frame else ""
        if caller.split(".")[0] in OURS and name.split(".")[0] not in OURS:
            wanted.add(name.split(".")[0])
        return None
sys.meta_path.insert(0, Spy())
"""


def undeclared_imports(code: str, extras: tuple[str, ...], tmp_path: Path) -> dict:
    script = (
        SPY + code + "from importlib.metadata import packages_distributions\n"
        "owners = packages_distributions()\n"
        "print(json.dumps({n: owners[n] for n in sorted(wanted) if n in owners}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    from packaging.utils import canonicalize_name

    declared = _declared(*extras)
    return {
        module: owners
        for module, owners in json.loads(result.stdout.splitlines()[-1]).items()
        # a module more than one distribution provides is declared if one of them is
        if not {canonicalize_name(d) for d in owners} & declared
    }


@pytest.mark.parametrize("extras", list(ROLES), ids=lambda e: "+".join(e) or "client")
def test_each_install_declares_every_package_it_imports(extras, tmp_path):
    """Every package the project's code imports while an install does its job is declared
    in pyproject.toml by the extras it is installed with (directly or through what those
    require). An import that only a bigger extra provides fails here, not in an image."""
    undeclared = undeclared_imports(ROLES[extras], extras, tmp_path)
    assert not undeclared, f"imported but not declared for {extras or 'the client'}: {undeclared}"


def test_the_import_check_catches_an_undeclared_import(tmp_path):
    assert set(undeclared_imports("import core.service.db\n", (), tmp_path)) == {"sqlalchemy"}
    assert undeclared_imports("import core.service.db\n", ("api",), tmp_path) == {}


@pytest.mark.parametrize("command", [["worker"], ["serve", "--port", "1"]])
def test_a_worker_for_a_device_that_is_not_here_does_not_start(tmp_path, command):
    """WORKER_DEVICE names a GPU this machine lacks: the worker would take every job and
    fail it (device_unavailable); it refuses to start instead, before touching the
    data directory or the broker."""
    import os

    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "S3_BUCKET")
    }
    env.update(UNLEARN_DATA_DIR=str(tmp_path / "state"), WORKER_DEVICE="cuda:99")
    result = subprocess.run(
        [sys.executable, "-m", "api", *command],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert (
        "error [device_unavailable]: device 'cuda:99' was asked for, but this machine has "
        in result.stderr
        and "; the worker did not start" in result.stderr
    ), result.stderr
    assert not (tmp_path / "state").exists()


def test_the_stack_scrapes_the_api_and_the_dashboard_reads_what_it_exposes(tmp_path):
    """Compose runs Prometheus on the API's /metrics; every series the Grafana dashboard
    queries is one /metrics serves (a renamed metric breaks this test, not a panel)."""
    import json
    import re

    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.service.settings import Settings

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "prometheus" in compose["services"]
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == ["api:8000"]
    assert scrape[0]["metrics_path"] == "/metrics"

    from core.service.migrate import upgrade

    settings = Settings(unlearn_data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        client.get("/healthz")
        broken = client.get("/metrics")  # no tables yet: the request metrics still come
        assert broken.status_code == 200 and "unlearn_jobs_readable 0.0" in broken.text
        upgrade(settings.db_url)
        families = [
            line.split()[2:4]
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("# TYPE ")
        ]
    suffixes = {
        "counter": ("",),
        "gauge": ("",),
        "summary": ("", "_sum", "_count"),
        "histogram": ("_bucket", "_sum", "_count"),
    }
    exposed = {
        name if kind == "counter" else name + suffix  # a counter's TYPE line names its _total
        for name, kind in families
        for suffix in suffixes.get(kind, ("",))
    }
    dashboard = json.loads((ROOT / "docker" / "grafana" / "unlearn-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"unlearn_[a-z_]+", target["expr"])
    }
    assert queried and queried <= exposed, queried - exposed


def test_the_local_override_replaces_every_public_image():
    """docker/compose.local.yml (hosts without a registry): each service of the stack runs
    on an image built here; the GPU worker is left to its profile, a CPU worker runs."""
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    local = yaml.safe_load((ROOT / "docker" / "compose.local.yml").read_text())["services"]
    for name, service in base.items():
        if name == "worker":
            assert local[name]["profiles"] == ["gpu"]
            continue
        image = local.get(name, {}).get("image", service.get("image", ""))
        assert image.startswith("unlearn-"), f"{name} would pull {image}"
    assert local["cpu-worker"]["image"].startswith("unlearn-worker:")
    assert local["cpu-worker"]["environment"]["WORKER_DEVICE"] == "cpu"
    assert "--build-arg TORCH=cpu" in (ROOT / "scripts" / "stack.sh").read_text()
