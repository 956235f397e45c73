#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch
# (pinned, so pip does not pull a multi-GB CUDA build), then this project with every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if .venv/bin/pip install -q --dry-run --no-index --no-deps "$TORCH" >/dev/null 2>&1; then
    .venv/bin/pip install -q "$TORCH"  # a wheel pip's find-links hold on this machine
  elif [ "$(uname -s)" = Linux ]; then
    # PyPI's Linux wheels are CUDA builds; PyTorch's CPU index has the CPU one.
    .venv/bin/pip install -q "$TORCH" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
      --extra-index-url https://pypi.org/simple
  else
    .venv/bin/pip install -q "$TORCH"  # macOS and Windows wheels on PyPI are CPU builds
  fi
fi
.venv/bin/pip install -q -c constraints.txt -e '.[dev]'
# The dashboard's browser test drives the system's Chromium (Debian's package), not a
# browser Playwright would download.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
  else
    echo "bootstrap: install Chromium (or set CHROMIUM to its binary) for the dashboard test" >&2
  fi
fi
