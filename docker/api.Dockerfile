# The API image: slim, no torch. The API imports only the torch-free parts of core
# (formats, spec, db, storage); jobs run in the worker image.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY docker/requirements-api.txt docker/requirements-api.txt
RUN pip install -r docker/requirements-api.txt
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
# --no-deps: the engine's ML dependencies (torch, transformers, peft...) stay out of this image.
RUN pip install --no-deps .
RUN useradd --uid 10001 --no-create-home unlearn
USER unlearn
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# unlearn serve runs uvicorn with the header deadline and connection cap (api/server.py).
CMD ["unlearn", "serve", "--no-with-worker", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
