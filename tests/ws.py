"""A small graphql-transport-ws client over the `websockets` package, for tests."""

from __future__ import annotations

import asyncio
import itertools
import json
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
        connection = await websockets.connect(url, subprotocols=["graphql-transport-ws"])  # type: ignore[list-item]
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
