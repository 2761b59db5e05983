# The relay as a container: `docker build -t outbox-relay .`
#   docker run --rm -e OUTBOX_DATABASE_URL=... -e OUTBOX_KAFKA_BOOTSTRAP=... outbox-relay
# Runs `outbox-relay run` as a non-root user, JSON logs on stderr, Prometheus metrics on
# :9464/metrics, and `outbox-relay status --check` as its health check. Migrations are a
# separate step: `docker run --rm -e OUTBOX_DATABASE_URL=... outbox-relay migrate`.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY relay ./relay
COPY migrations ./migrations
# The relay with both brokers; the runtime stage installs these wheels only (--no-index).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[kafka,redis]" \
    && echo "outbox[kafka,redis]" > /wheels/requirements.txt

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels -r /wheels/requirements.txt \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
USER 10001
ENV PYTHONUNBUFFERED=1 \
    OUTBOX_LOG_FORMAT=json \
    OUTBOX_METRICS_PORT=9464
EXPOSE 9464
# Unhealthy when the oldest pending event is over a minute old, or events wait and no relay
# is alive (see `outbox-relay status --help`).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["outbox-relay", "status", "--check"]
# SIGTERM: the relay finishes its batch and releases its leases (--shutdown-timeout, 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
