# The GPU worker: CUDA torch, the engine, lm-eval. One worker process per GPU
# (CUDA_VISIBLE_DEVICES), prefork with one child, the model loaded in the child.
# torch 2.11 brings Triton 3.6, the version the loss kernels (core/engine/losses/triton_kernels.py) were
# run on, so the default loss backend (auto) uses them; Triton builds each kernel's
# launcher with a C compiler at first use, which the runtime image lacks.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
WORKDIR /app
# The dependency layer (the `worker` extra), rebuilt only when pyproject.toml or
# constraints.txt change. torch comes with the base image; pip keeps it (the project asks
# for torch>=2.4, and constraints.txt does not pin it).
COPY pyproject.toml README.md constraints.txt ./
RUN mkdir core api worker migrations \
    && touch core/__init__.py api/__init__.py worker/__init__.py migrations/__init__.py \
    && pip install -c constraints.txt ".[worker]" && pip uninstall -y unlearn-service \
    && rm -r core api worker migrations
COPY alembic.ini ./
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
RUN pip install --no-deps .
RUN useradd --uid 10001 --create-home unlearn && mkdir -p /data && chown unlearn /data
USER unlearn
ENV UNLEARN_DATA_DIR=/data
CMD ["unlearn", "worker"]
