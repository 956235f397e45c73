#!/usr/bin/env bash
# The static checks CI runs before the tests: lint, format, types, and the layering
# contracts (pyproject.toml's [tool.importlinter]). Any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy core api worker
.venv/bin/lint-imports
