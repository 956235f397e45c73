# The worker: torch, the engine, lm-eval. One worker process per GPU
# (CUDA_VISIBLE_DEVICES), prefork with one child, the model loaded in the child. The GPU
# image and the CPU image come from this file; build arguments choose:
#   BASE_IMAGE      default pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime (CUDA torch
#                   inside); the CPU image: python:3.11-slim or the local Debian base
#   TORCH           base: keep the base image's torch (default); cpu: install torch's CPU
#                   build; cuda: install torch's CUDA build from PyPI
#   TORCH_REQUIREMENT  the torch release for cpu/cuda (default torch==2.13.0)
#   TORCH_INDEX_URL    where the CPU build comes from online (PyTorch's CPU index)
#   WHEELHOUSE_URL  empty: packages come from the index; else a find-links location
#                   (scripts/wheelhouse.sh's output over HTTP) and pip uses nothing else
#   VERSION, REVISION  the OCI labels
# torch 2.11 brings Triton 3.6, the version the loss kernels (core/engine/losses/triton_kernels/) were
# run on, so the default loss backend (auto) uses them; Triton builds each kernel's
# launcher with a C compiler at first use, which the runtime image lacks: a CUDA build
# installs gcc, a CPU build (no Triton) does not.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG TORCH=base
ARG TORCH_REQUIREMENT=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELHOUSE_URL=
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="unlearn-worker" \
      org.opencontainers.image.description="The unlearning service's worker (torch: ${TORCH})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="docker/worker.Dockerfile"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
RUN if [ "$TORCH" != cpu ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# torch first, so the project's range (torch>=2.4) keeps it.
RUN set -e; wheels="${WHEELHOUSE_URL:+--no-index --find-links $WHEELHOUSE_URL}"; \
    case "$TORCH" in \
      base) python3 -c "import torch" ;; \
      cpu) if [ -n "$wheels" ]; then python3 -m pip install $wheels "$TORCH_REQUIREMENT"; \
           else python3 -m pip install "$TORCH_REQUIREMENT" --index-url "$TORCH_INDEX_URL" \
                --extra-index-url https://pypi.org/simple; fi ;; \
      cuda) python3 -m pip install $wheels "$TORCH_REQUIREMENT" ;; \
      *) echo "TORCH is base, cpu or cuda, not '$TORCH'" >&2; exit 2 ;; \
    esac
WORKDIR /app
# The dependency layer (the `worker` extra), rebuilt only when pyproject.toml or
# constraints.txt change (constraints.txt does not pin torch).
COPY pyproject.toml constraints.txt ./
RUN mkdir core api worker migrations \
    && touch README.md core/__init__.py api/__init__.py worker/__init__.py migrations/__init__.py \
    && python3 -m pip install ${WHEELHOUSE_URL:+--no-index --find-links "$WHEELHOUSE_URL"} \
       -c constraints.txt ".[worker]" && python3 -m pip uninstall -y unlearn-service \
    && rm -rf core api worker migrations build ./*.egg-info
COPY alembic.ini README.md ./
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
RUN python3 -m pip install ${WHEELHOUSE_URL:+--no-index --find-links "$WHEELHOUSE_URL"} --no-deps . \
    && rm -rf build ./*.egg-info
RUN useradd --uid 10001 --create-home unlearn && mkdir -p /data && chown unlearn /data
USER unlearn
ENV UNLEARN_DATA_DIR=/data
# Alive: the Celery worker answers a ping over the broker.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s \
    CMD python3 -m celery -A worker.celery_app inspect ping -d "celery@$(hostname)" --timeout 10 >/dev/null
CMD ["unlearn", "worker"]
