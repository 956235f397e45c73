# The API image: slim, no torch. It installs the project with the `api` extra
# (pyproject.toml): the web server, database, queue, storage and signing packages; the
# engine's ML packages stay out. Jobs run in the worker image.
#
# Build arguments (docs/operations.md, "Building the images"):
#   BASE_IMAGE      a Debian-like image with Python 3.11 and pip (default python:3.11-slim;
#                   air-gapped: the local Debian base, scripts/stack.sh makes one)
#   WHEELHOUSE_URL  empty: packages come from the index; else a find-links location (an
#                   HTTP directory listing of scripts/wheelhouse.sh's output) and pip
#                   uses nothing else
#   VERSION, REVISION  the OCI labels (the release and the git commit)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG WHEELHOUSE_URL=
LABEL org.opencontainers.image.title="unlearn-api" \
      org.opencontainers.image.description="The unlearning service's API (no torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="docker/api.Dockerfile"
# PIP_BREAK_SYSTEM_PACKAGES: on a Debian base the image's Python is the system's; the
# image is the environment.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /app
# The dependency layer, rebuilt only when pyproject.toml or constraints.txt change: the
# packages are empty here, the project itself is installed below without its deps.
COPY pyproject.toml constraints.txt ./
RUN mkdir core api worker migrations \
    && touch README.md core/__init__.py api/__init__.py worker/__init__.py migrations/__init__.py \
    && python3 -m pip install ${WHEELHOUSE_URL:+--no-index --find-links "$WHEELHOUSE_URL"} \
       -c constraints.txt ".[api]" && python3 -m pip uninstall -y unlearn-service \
    && rm -rf core api worker migrations build ./*.egg-info
COPY alembic.ini README.md ./
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
RUN python3 -m pip install ${WHEELHOUSE_URL:+--no-index --find-links "$WHEELHOUSE_URL"} --no-deps . \
    && rm -rf build *.egg-info
# The process's own state (UNLEARN_DATA_DIR): nothing durable, the stack's is in Postgres and S3.
RUN useradd --uid 10001 --no-create-home unlearn && mkdir -p /data && chown unlearn /data
USER unlearn
ENV UNLEARN_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# unlearn serve runs uvicorn with the header deadline and connection cap (api/server.py).
CMD ["unlearn", "serve", "--no-with-worker", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
