"""A lean HTTP/1.1 keep-alive client on asyncio streams: pre-encoded requests, Content-Length bodies.

httpx spends several times more CPU per request than the server's bare route; on two shared cores
that would make the generator the bottleneck, so requests are bytes built once and responses are
read by Content-Length with no header parsing beyond it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit

# The API key of a run with keys on, sent with every request; set once, before any request.
_KEY: str | None = None
EXTRA_HEADERS = ""


def authorize(key: str | None) -> None:
    global _KEY, EXTRA_HEADERS
    _KEY = key
    EXTRA_HEADERS = f"Authorization: Bearer {key}\r\n" if key else ""


def connection_init_payload() -> dict[str, str]:
    """What a WebSocket sends in `connection_init`: the key, as an HTTP request would."""
    return {"Authorization": f"Bearer {_KEY}"} if _KEY else {}


class HTTPError(Exception):
    """The server answered something the benchmark cannot read as a success."""


def graphql_request(
    host: str, query: str, variables: dict[str, Any], path: str = "/graphql"
) -> bytes:
    body = json.dumps({"query": query, "variables": variables}, separators=(",", ":")).encode()
    return post_request(host, path, body)


def post_request(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{EXTRA_HEADERS}\r\n"
    )
    return head.encode() + body


def get_request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{EXTRA_HEADERS}\r\n".encode()


class Connection:
    """One keep-alive connection; `send` writes a whole request and returns (status, body)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.authority = f"{self.host}:{self.port}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 22
        )

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            await self.open()
        assert self._reader is not None
        assert self._writer is not None
        try:
            self._writer.write(raw)
            head = await self._reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                end = lower.index(b"\r\n", at + 2)
                body = await self._reader.readexactly(int(lower[at + 17 : end]))
            elif b"transfer-encoding: chunked" in lower:
                body = await self._read_chunked()
            else:
                raise HTTPError(f"response without Content-Length: {head[:200]!r}")
            if b"\r\nconnection: close" in lower:
                await self.close()
            return status, body
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await self.close()  # the next send reconnects
            raise

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size + 2))
            parts[-1] = parts[-1][:-2]

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
