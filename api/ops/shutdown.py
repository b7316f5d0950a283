"""Graceful shutdown: on SIGTERM stop listening, answer waiting claims, drain in-flight requests,
close subscriptions, and exit 0 within the grace period."""

from __future__ import annotations

import logging
import signal
import socket

import uvicorn
from starlette.applications import Starlette

from api.ops.collector import Collector

log = logging.getLogger("taskorch.shutdown")


class GracefulServer(uvicorn.Server):
    """uvicorn closes the listening sockets, sends WebSocket clients a 1012 close (which ends their
    subscriptions), waits up to `timeout_graceful_shutdown` for in-flight requests, then runs the
    lifespan shutdown. Before that wait, waiting claims are told to answer now: a claim waiting
    for work would otherwise hold the drain for as long as it asked to wait. While it serves, the
    objects startup built are left out of the garbage collector's passes (api/ops/collector.py)."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.starlette = app
        self.collector = Collector()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.collector.start()  # what startup built is frozen only once it is all there

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service = getattr(self.starlette.state, "service", None)
        if service is not None:
            log.info("shutting down: waiting claims answer now, in-flight requests may finish")
            service.stop_waiting()
        await super().shutdown(sockets)
        self.collector.stop()


def serve(
    app: Starlette, config: uvicorn.Config, sockets: list[socket.socket] | None = None
) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a stop asked
    # for by SIGTERM or Ctrl-C that completed cleanly is a success: exit 0 rather than die by it.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda signum, frame: None)
    GracefulServer(config, app).run(sockets=sockets)
