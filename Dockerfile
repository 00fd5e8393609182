# Tollgate: a slim, non-root image. The LiteLLM Proxy runs in its own container
# (see docker-compose.yml); point TOLLGATE_UPSTREAM_URL at it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOLLGATE_CONFIG=/app/config.yaml \
    TOLLGATE_DATABASE_URL=sqlite:////data/tollgate.db

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /app tollgate \
 && mkdir /data && chown tollgate /data
COPY config.yaml ./

USER tollgate
VOLUME ["/data"]
EXPOSE 8003
# On the port Tollgate's own configuration names (server.port, 8003 unless changed): a mounted
# config.yaml with another port must not make a healthy container unhealthy.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; from proxy.config import load_config; urllib.request.urlopen(f'http://127.0.0.1:{load_config().server.port}/health/live', timeout=2)"
CMD ["tollgate", "serve", "--host", "0.0.0.0"]
