"""The `unlearn` command: the engine's commands (run, build-demo, bench, from core.cli)
grafted with the service's, one module per side:

- operator.py: migrate, keys, models, tenants, audit verify, signing-keys (the database);
- processes.py: serve and worker;
- demo.py: the demo, over REST;
- verify.py: a certificate, checked offline;
- tenant.py: files and jobs, over REST with the Python client (the base install).

`unlearn` with only the base install (the client) imports every module here, so none
imports a package of the api or worker extras at its top: where a command needs one, it
imports it inside (tests/service/test_deploy.py and the contracts in pyproject.toml check
it)."""

from __future__ import annotations

from api.cli import demo, operator, processes, tenant, verify
from core import cli as core_cli

app = core_cli.app
# Registered in this order, listed in this order by `unlearn --help` (after the engine's).
app.command()(operator.migrate)
app.command()(verify.verify)
app.command()(processes.worker)
app.command()(processes.serve)
app.command()(demo.demo)
app.add_typer(tenant.files_app, name="files")
app.add_typer(tenant.jobs_app, name="jobs")
app.add_typer(operator.keys_app, name="keys")
app.add_typer(operator.models_app, name="models")
app.add_typer(operator.tenants_app, name="tenants")
app.add_typer(operator.audit_app, name="audit")
app.add_typer(operator.signing_app, name="signing-keys")


def main() -> None:  # pragma: no cover
    app()
