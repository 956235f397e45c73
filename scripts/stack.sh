#!/usr/bin/env bash
# The compose stack on a host without an image registry, step by step:
#
#   bash scripts/stack.sh engine      install (Debian's docker.io, docker-compose,
#                                     debootstrap) and start dockerd where none answers
#   bash scripts/stack.sh base        the local Debian base image (debootstrap, docker
#                                     import), made once and kept: unlearn-base:$SUITE
#   bash scripts/stack.sh wheelhouse  scripts/wheelhouse.sh into the cache (CPU torch)
#   bash scripts/stack.sh images      the API, CPU worker and services images, with
#                                     packages only from the wheelhouse (air-gapped build)
#   bash scripts/stack.sh prepare     all four
#   bash scripts/stack.sh up|down     the stack (docker-compose.yml + docker/compose.local.yml)
#   bash scripts/stack.sh compose ARGS...  docker-compose with the stack's files and project
#
# The cache (UNLEARN_CACHE, default /var/cache/unlearn, else ~/.cache/unlearn) lives outside
# the checkout: a clean clone reuses the base image and the wheelhouse. A failed step
# names itself and exits non-zero.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if [ -z "${UNLEARN_CACHE:-}" ]; then
  UNLEARN_CACHE=/var/cache/unlearn
  { mkdir -p "$UNLEARN_CACHE" && [ -w "$UNLEARN_CACHE" ]; } 2>/dev/null || UNLEARN_CACHE=$HOME/.cache/unlearn
fi
mkdir -p "$UNLEARN_CACHE"
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=${UNLEARN_BASE_IMAGE:-unlearn-base:$SUITE}
export UNLEARN_IMAGE_TAG=${UNLEARN_IMAGE_TAG:-local}
PROJECT=${COMPOSE_PROJECT_NAME:-unlearnstack}
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml -f docker/compose.local.yml)
VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)

die() {
  echo "stack: step '$1' failed: $2" >&2
  exit 1
}

engine() {
  if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
    || ! command -v debootstrap >/dev/null; then
    $SUDO apt-get install -y -q docker.io docker-compose debootstrap >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q docker.io docker-compose debootstrap >/dev/null; } \
      || die engine "apt-get could not install docker.io docker-compose debootstrap"
  fi
  if docker info >/dev/null 2>&1; then return; fi
  log=$UNLEARN_CACHE/dockerd.log
  # No systemd here: dockerd runs in the background until the host stops.
  $SUDO sh -c "nohup dockerd --storage-driver overlay2 >'$log' 2>&1 &"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  tail -n 20 "$log" >&2
  die engine "dockerd did not answer within 60 s (log above: $log)"
}

base() {
  if docker image inspect "$BASE" >/dev/null 2>&1; then
    echo "stack: base image $BASE is there"
    return
  fi
  root=$UNLEARN_CACHE/rootfs-$SUITE
  $SUDO rm -rf "$root.tmp"
  echo "stack: making $BASE with debootstrap ($SUITE from $MIRROR)"
  $SUDO nice -n 10 debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
    "$SUITE" "$root.tmp" "$MIRROR" >"$UNLEARN_CACHE/debootstrap.log" 2>&1 \
    || { tail -n 20 "$UNLEARN_CACHE/debootstrap.log" >&2; die base "debootstrap failed"; }
  $SUDO rm -rf "$root.tmp"/var/cache/apt/archives/*.deb "$root.tmp"/var/lib/apt/lists/*
  $SUDO tar -C "$root.tmp" -c . | docker import -c "ENV LANG=C.UTF-8" - "$BASE" >/dev/null \
    || die base "docker import failed"
  $SUDO rm -rf "$root.tmp"
}

wheelhouse() {
  nice -n 10 bash scripts/wheelhouse.sh "$UNLEARN_CACHE/wheelhouse-cpu" cpu 2>&1 \
    | grep -v "^WARNING: Location" || die wheelhouse "scripts/wheelhouse.sh failed"
}

build() {  # NAME DOCKERFILE [--build-arg ...]: one image, its log kept in the cache
  name=$1 file=$2
  shift 2
  log=$UNLEARN_CACHE/build-$name.log
  echo "stack: building $name:$UNLEARN_IMAGE_TAG ($file)"
  if ! DOCKER_BUILDKIT=0 nice -n 10 docker build --force-rm --network host -f "$file" \
    -t "$name:$UNLEARN_IMAGE_TAG" --build-arg "BASE_IMAGE=$BASE" \
    --build-arg "WHEELHOUSE_URL=$WHEELS_URL" --build-arg "VERSION=$VERSION" \
    --build-arg "REVISION=$REVISION" "$@" . >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "images ($name)" "docker build failed (log above: $log)"
  fi
}

images() {
  # The wheelhouse over HTTP on loopback, for the builds only (the build containers share
  # the host's network): pip in the images sees nothing else.
  port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  python3 -m http.server --bind 127.0.0.1 "$port" --directory "$UNLEARN_CACHE/wheelhouse-cpu" \
    >/dev/null 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null' RETURN
  WHEELS_URL=http://127.0.0.1:$port/
  build unlearn-api docker/api.Dockerfile
  build unlearn-worker docker/worker.Dockerfile --build-arg TORCH=cpu
  build unlearn-services docker/services.Dockerfile
}

case "${1:-}" in
  engine) engine ;;
  base) base ;;
  wheelhouse) wheelhouse ;;
  images) images ;;
  prepare) engine && base && wheelhouse && images ;;
  up) "${COMPOSE[@]}" up -d --no-build || die up "docker-compose up failed" ;;
  down) "${COMPOSE[@]}" down -v --remove-orphans || die down "docker-compose down failed" ;;
  compose) shift && exec "${COMPOSE[@]}" "$@" ;;
  *) sed -n 2,17p "$0" >&2 && exit 2 ;;
esac
