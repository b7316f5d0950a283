"""What every resolver gets: the service, and the request or socket it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import strawberry
from starlette.requests import Request
from starlette.websockets import WebSocket

from api.core.service import TaskService


@dataclass
class Context:
    service: TaskService
    request: Request | WebSocket
    response: Any = None
    # The id of the event a subscription resolver yielded last: a shared subscription reads it to
    # know which event each result carries (api/interfaces/gql/fanout.py).
    delivered: int | None = None


Info = strawberry.Info[Context, None]
