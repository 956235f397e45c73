# The API image: slim, no torch. It installs the project with the `api` extra
# (pyproject.toml): the web server, database, queue, storage and signing packages; the
# engine's ML packages stay out. Jobs run in the worker image.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The dependency layer, rebuilt only when pyproject.toml or constraints.txt change: the
# packages are empty here, the project itself is installed below without its deps.
COPY pyproject.toml README.md constraints.txt ./
RUN mkdir core api worker migrations \
    && touch core/__init__.py api/__init__.py worker/__init__.py migrations/__init__.py \
    && pip install -c constraints.txt ".[api]" && pip uninstall -y unlearn-service \
    && rm -r core api worker migrations
COPY alembic.ini ./
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
RUN pip install --no-deps .
RUN useradd --uid 10001 --no-create-home unlearn
USER unlearn
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# unlearn serve runs uvicorn with the header deadline and connection cap (api/server.py).
CMD ["unlearn", "serve", "--no-with-worker", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
