"""`python -m core run SPEC` reproduces any job from its spec, without the service."""

from core.cli import app

app()
