"""A small graphql-transport-ws client over the `websockets` package, for tests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import struct
import urllib.parse
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

EVENT_FIELDS = "id taskId status previousStatus workerId at details workDirectory"
SUBSCRIBE = f"""subscription($taskId: ID, $dir: String, $statuses: [TaskStatus!], $after: ID) {{
  taskEvents(taskId: $taskId, workDirectory: $dir, statuses: $statuses, after: $after) {{
    {EVENT_FIELDS} }} }}"""


class Subscriber:
    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, url: str, payload: dict[str, Any] | None = None) -> Subscriber:
        connection = await websockets.connect(
            url,
            subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
        )
        await connection.send(json.dumps({"type": "connection_init", "payload": payload or {}}))
        ack = json.loads(await asyncio.wait_for(connection.recv(), 10))
        assert ack["type"] == "connection_ack", ack
        return cls(connection)

    async def subscribe(self, query: str = SUBSCRIBE, **variables: Any) -> str:
        op_id = str(next(self._ids))
        await self.connection.send(
            json.dumps(
                {
                    "id": op_id,
                    "type": "subscribe",
                    "payload": {"query": query, "variables": variables},
                }
            )
        )
        return op_id

    async def message(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next message other than pings."""
        while True:
            message: dict[str, Any] = json.loads(
                await asyncio.wait_for(self.connection.recv(), timeout)
            )
            if message["type"] == "ping":
                await self.connection.send(json.dumps({"type": "pong"}))
                continue
            return message

    async def event(self, timeout: float = 10.0) -> dict[str, Any]:
        message = await self.message(timeout)
        assert message["type"] == "next", message
        assert not message["payload"].get("errors"), message
        event: dict[str, Any] = message["payload"]["data"]["taskEvents"]
        return event

    async def events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [await self.event(timeout) for _ in range(count)]

    async def close(self) -> None:
        await self.connection.close()


class StalledSubscriber:
    """A subscriber that stops reading its socket, with a tiny receive buffer: the server's sends
    to it block, as with a client on a slow link. Raw sockets, since client libraries read ahead."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pending = b""

    @classmethod
    def connect(
        cls, url: str, query: str, variables: dict[str, Any] | None = None
    ) -> StalledSubscriber:
        host, port = urllib.parse.urlsplit(url).netloc.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /graphql HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n"
            ).encode()
        )
        subscriber = cls(sock)
        head = subscriber._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        subscriber._send({"type": "connection_init", "payload": {}})
        assert subscriber.message()["type"] == "connection_ack"
        subscriber._send(
            {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": query, "variables": variables or {}},
            }
        )
        return subscriber

    def _send(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        header = bytes([0x81])  # FIN, text
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, count: int) -> bytes:
        while len(self._pending) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._pending += chunk
        data, self._pending = self._pending[:count], self._pending[count:]
        return data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._pending += chunk
        head, _, self._pending = self._pending.partition(marker)
        return head

    def message(self) -> dict[str, Any]:
        """The next text message (blocking); a close frame raises ConnectionError."""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            payload = self._read(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError(
                    f"closed by the server: {payload[2:].decode(errors='replace')}"
                )
            if opcode == 0x1:
                message: dict[str, Any] = json.loads(payload)
                if message["type"] == "ping":
                    self._send({"type": "pong"})
                    continue
                return message

    def close(self) -> None:
        self.sock.close()
