# taskorch server image: python:3.11-slim, non-root, SQLite data in the /data volume.
#   docker build -t taskorch .                      (the server, the default target)
#   docker build --target jupyter -t taskorch-jupyter .   (notebooks with the analytics extras)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY analytics ./analytics
RUN pip install . \
    && useradd --system --uid 10001 --user-group --home-dir /data --create-home taskorch
ENV TASKORCH_HOST=0.0.0.0 \
    TASKORCH_PORT=8080 \
    TASKORCH_DATABASE_URL=sqlite:////data/taskorch.db

FROM base AS jupyter
RUN pip install "/app[analytics]" jupyterlab
COPY notebooks ./notebooks
USER taskorch
EXPOSE 8888
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--notebook-dir=/app/notebooks"]

FROM base AS server
USER taskorch
VOLUME ["/data"]
EXPOSE 8080
# /health answers 503 when the database does not; urlopen raises on it, so the check fails.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TASKORCH_PORT', '8080'), timeout=2)"]
# SIGTERM: stop listening, let in-flight requests finish (TASKORCH_SHUTDOWN_TIMEOUT), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["taskorch"]
CMD ["serve"]
