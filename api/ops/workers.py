"""`serve --workers N`: N server processes on one port, started, watched and stopped together.

Each worker is a whole `taskorch serve` process of its own (its own store connections, event bus
and lease sweep, exactly as separate replicas on one database), listening on its own socket bound
with SO_REUSEPORT, so the kernel spreads new connections over the workers without a balancer in
front. The supervisor holds no socket and serves nothing: it runs the migrations once, starts the
workers, passes SIGTERM and SIGINT on to each, and exits 0 once every one has stopped cleanly."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from api.settings import Settings

log = logging.getLogger("taskorch.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BACKLOG = 2048  # uvicorn's default
# A worker is told to stop and given its grace period; past this much more it is killed.
KILL_MARGIN_SECONDS = 10.0
ORPHAN_CHECK_SECONDS = 0.5


def _bound(host: str, port: int, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other workers bind to the same address; the kernel balances."""
    sock = _bound(host, port, reuse_port=True)
    sock.listen(BACKLOG)
    return sock


def port_in_use(host: str, port: int) -> str | None:
    """Why the port cannot be had, or None. SO_REUSEPORT would let a second `serve --workers` on
    the same port quietly share it with the first, so the supervisor first binds it alone."""
    try:
        _bound(host, port, reuse_port=False).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def stop_when_orphaned(interval: float = ORPHAN_CHECK_SECONDS) -> None:
    """In a worker: stop gracefully (SIGTERM to itself) once the supervisor is gone, say killed
    with SIGKILL, so no worker keeps serving a port nobody supervises. Workers have their own
    process group, so nothing else would tell them."""
    supervisor = os.getppid()

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(interval)
        log.warning("the supervisor (pid %d) is gone; stopping this worker", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def worker_environment(settings: Settings) -> dict[str, str]:
    """What a worker reads its settings from: the supervisor's, flags included, as variables
    (never command-line arguments, which every local user can read, with the database password)."""
    return {
        **os.environ,
        "TASKORCH_DATABASE_URL": settings.database_url,
        "TASKORCH_HOST": settings.host,
        "TASKORCH_PORT": str(settings.port),
        "TASKORCH_DURABILITY": settings.durability,
        "TASKORCH_LOG_LEVEL": settings.log_level,
        "TASKORCH_MCP_TOOLS": settings.mcp_tools,
        "TASKORCH_WORKERS": "1",
    }


@contextmanager
def metrics_directory() -> Iterator[str]:
    """Where the workers' Prometheus files go, so that any worker's /metrics shows the total: the
    operator's PROMETHEUS_MULTIPROC_DIR if set, else a fresh directory removed afterwards."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        yield given
        return
    made = tempfile.mkdtemp(prefix="taskorch-metrics-")
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def supervise(settings: Settings, count: int) -> int:
    """Run `count` workers until a stop signal (exit 0 when all stop cleanly) or until one dies
    on its own (the others are stopped; exit 1, so a service manager restarts the whole set)."""
    problem = port_in_use(settings.host, settings.port)
    if problem is not None:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, problem)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, on_signal)
    with metrics_directory() as metrics_dir:
        env = {**worker_environment(settings), MULTIPROC_ENV: metrics_dir}
        command = [sys.executable, "-m", "api.cli", "serve", "--reuse-port"]
        # Own process group: a terminal's Ctrl-C reaches the supervisor only, which passes it on
        # once; a second SIGINT would make uvicorn skip the graceful drain.
        workers = [subprocess.Popen(command, env=env, process_group=0) for _ in range(count)]
        log.info(
            "started %d workers on port %d: pids %s",
            count,
            settings.port,
            ", ".join(str(w.pid) for w in workers),
        )
        failed: subprocess.Popen[bytes] | None = None
        while not stop.wait(0.2):
            failed = next((w for w in workers if w.poll() is not None), None)
            if failed is not None:
                log.error(
                    "worker %d exited with %s; stopping the others", failed.pid, failed.returncode
                )
                break
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        codes = [
            _wait(worker, settings.shutdown_timeout + KILL_MARGIN_SECONDS) for worker in workers
        ]
    if failed is not None:
        return 1
    bad = [code for code in codes if code != 0]
    if bad:
        log.error("%d of %d workers did not stop cleanly: exit codes %s", len(bad), count, bad)
        return 1
    log.info("all %d workers stopped", count)
    return 0


def _wait(worker: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return worker.wait(timeout)
    except subprocess.TimeoutExpired:
        log.error("worker %d did not stop within %.0f s; killing it", worker.pid, timeout)
        worker.kill()
        return worker.wait()
