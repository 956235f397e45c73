#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch
# (pinned, so pip does not pull a multi-GB CUDA build), then this project.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -c constraints.txt -e '.[dev]'
