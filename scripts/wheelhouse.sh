#!/usr/bin/env bash
# The wheelhouse for an air-gapped image build: every wheel the images install, fetched
# once on a host that can reach a package index, then copied to the build host.
#
#   bash scripts/wheelhouse.sh DIR [cpu|cuda|none]
#
# DIR gets the wheels of `.[worker]` (which includes `.[api]`) under constraints.txt,
# the build backend (setuptools) for the project's own install, moto's server (the stack
# test's S3), what a marker asks for on an older Python of the same minor release (redis
# wants async-timeout below 3.11.3, and Debian bookworm's Python is 3.11.2; WHEELHOUSE_EXTRA
# replaces that list) and torch: `cpu` (default) the CPU build, `cuda` the CUDA build from PyPI,
# `none` no torch (a CUDA base image that brings its own). A finished wheelhouse holds a
# `requirements.txt` naming what it was made from; a DIR whose stamp matches is left as
# it is. TORCH (default torch==2.13.0) and TORCH_INDEX_URL (the CPU index) override.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:?usage: wheelhouse.sh DIR [cpu|cuda|none]}
FLAVOUR=${2:-cpu}
TORCH=${TORCH:-torch==2.13.0}
PIP=${PIP:-python3 -m pip}
case "$FLAVOUR" in
  cpu | cuda | none) ;;
  *) echo "wheelhouse: the torch build is cpu, cuda or none, not '$FLAVOUR'" >&2; exit 2 ;;
esac
mkdir -p "$DIR"
# What the wheelhouse is made from (the requirements in pyproject.toml, constraints.txt):
# the stamp changes when any of it does.
deps=$(python3 -c "import json, sys, tomllib; p = tomllib.load(open(sys.argv[1], 'rb'))['project']; print(json.dumps([p['dependencies'], p['optional-dependencies']], sort_keys=True))" "$ROOT/pyproject.toml")
stamp=$({ echo "$deps"; cat "$ROOT/constraints.txt"; } | sha256sum | cut -c1-16)
stamp="$stamp $FLAVOUR $TORCH"
if [ -f "$DIR/.stamp" ] && [ "$(cat "$DIR/.stamp")" = "$stamp" ]; then
  echo "wheelhouse: $DIR is up to date ($(ls "$DIR"/*.whl | wc -l) wheels)"
  exit 0
fi
rm -f "$DIR/.stamp"
torch_args=()
if [ "$FLAVOUR" = cpu ]; then
  # A CPU wheel that pip's find-links hold on this host, else PyTorch's CPU index.
  if $PIP download -q --no-index --no-deps -d "$DIR" "$TORCH" >/dev/null 2>&1; then
    :
  else
    $PIP download -q --no-deps -d "$DIR" "$TORCH" \
      --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  fi
  torch_args=("$TORCH")
elif [ "$FLAVOUR" = cuda ]; then
  torch_args=("$TORCH")
fi
# The project's own requirements (not the project: it is built from the source inside
# the image), resolved together with torch so the wheelhouse is one consistent set.
$PIP download -q -d "$DIR" -c "$ROOT/constraints.txt" --find-links "$DIR" \
  "${torch_args[@]}" "$ROOT[worker]" "setuptools>=69" wheel "moto[server]" \
  ${WHEELHOUSE_EXTRA:-"async-timeout>=4.0.3"}
# pip download also leaves the project's own sdist/zip when given a path: drop it.
rm -f "$DIR"/unlearn_service-* "$DIR"/unlearn-service-*
# A release published only as an sdist becomes a wheel here, so the image build needs
# no compiler and no build backend for it.
for sdist in "$DIR"/*.tar.gz "$DIR"/*.zip; do
  [ -e "$sdist" ] || continue
  $PIP wheel -q --no-deps --no-index --find-links "$DIR" -w "$DIR" "$sdist"
  rm "$sdist"
done
if [ "$FLAVOUR" = none ]; then
  rm -f "$DIR"/torch-* "$DIR"/nvidia_* "$DIR"/triton-*
fi
echo "$stamp" >"$DIR/.stamp"
echo "wheelhouse: $DIR holds $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
