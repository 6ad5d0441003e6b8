# syntax=docker/dockerfile:1
# The project image: every TARS service (workers, Flower, metrics, mock LLM, migrate, loadgen).
#   docker compose build        (or: docker build -t tars-fleet .)

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependency layer: only pyproject.toml, so editing the code does not reinstall dependencies.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
# The project itself (no dependency resolution: they are all in the layer above).
COPY README.md ./
COPY config ./config
COPY tars_tasks ./tars_tasks
COPY workers ./workers
COPY migrations ./migrations
COPY loadgen ./loadgen
RUN pip install --no-deps .

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 tars \
    && useradd --system --uid 10001 --gid tars --home-dir /home/tars --create-home --shell /usr/sbin/nologin tars \
    && mkdir -p /app/reports /data \
    && chown tars:tars /app /app/reports /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER tars:tars
# Celery's warm shutdown starts on SIGTERM (compose's default stop signal).
STOPSIGNAL SIGTERM
CMD ["tars", "--help"]
