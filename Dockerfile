# syntax=docker/dockerfile:1.19
# Image for the Dagster webserver and daemon of docker-compose.yml (the brokers use their
# official images). Build context: the repo root.
FROM python:3.11-slim-bookworm

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /usr/local/bin/

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Dependencies first (cached layer), exactly as locked.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra k8s --no-install-project

# The project. Local state (venv, broker stack, lake, Dagster home) stays out of the image.
COPY --exclude=.git --exclude=.venv --exclude=.stack --exclude=lake --exclude=dagster_home \
     --exclude=**/__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache . .
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra k8s   # dagster-postgres and dagster-k8s, locked with dagster

ENV PATH=/app/.venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    LAKE_ROOT=/app/lake \
    INGEST_STACK_EXTERNAL=1

RUN mkdir -p /opt/dagster/dagster_home /app/lake \
 && python -m ingest_defs.assets.dbt parse   # the manifest is built here, never parsed at import
COPY deploy/dagster.postgres.yaml /opt/dagster/dagster_home/dagster.yaml

EXPOSE 3000
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "/app/workspace.yaml"]
