"""Who is calling and may they: API key authentication, protected mode, rate limits, body size.

Every interface shares one pure ASGI middleware, `AuthMiddleware`. For each HTTP request (and each
WebSocket upgrade) it resolves the caller once and stores a `Principal` in `scope["state"]`, so a
handler reads it as `request.state.principal` (or `principal_of(request)`). Only `OPEN_PATHS`
(`/health`, `/metrics`) are served without it.

Interfaces enforce scopes with one call, the same everywhere, naming the service operation:

    from api.security.auth import principal_of, require
    require(principal_of(request), "cancel")   # raises Forbidden (code FORBIDDEN)

`OPERATION_SCOPES` is the one table of which scope each operation needs: `read` (reads and
subscriptions), `submit` (submit, cancel, retry, update), `work` (claim, heartbeat, complete, fail,
release, report progress, append to a log), `review` (approve, reject); `admin` allows
everything, and is what an operation missing from the table needs.

Errors the middleware answers itself: 401 UNAUTHENTICATED, 429 RATE_LIMITED (with Retry-After),
413 PAYLOAD_TOO_LARGE, 503 UNAVAILABLE. Under `/api/v1` the body is the REST envelope; elsewhere it
is GraphQL-shaped: `{"data": null, "errors": [{"message", "extensions": {"code"}}]}`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from api.core.errors import (
    PayloadTooLarge,
    RateLimited,
    TaskorchError,
    Unauthenticated,
    Unavailable,
    forbidden,
    missing_key,
)
from api.interfaces.envelope import envelope, is_rest
from api.invocation import command
from api.ops.metrics import RATE_LIMITED
from api.security.keys import ADMIN, READ, REVIEW, SCOPES, SUBMIT, WORK, hash_key
from api.security.ratelimit import RateLimiter
from api.security.redact import redact
from api.settings import Settings
from api.store.base import TaskStore

log = logging.getLogger("taskorch.auth")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/metrics"})
# WebSocket paths whose handler takes the key from its connection_init message and closes the
# socket with 4401 itself; every other socket needs a valid key on the upgrade request.
SOCKET_PATHS = frozenset({"/graphql"})
# Keys are looked up on every request, uncached: a revoked key, or the first key created while the
# server runs, takes effect on the very next request, in every replica. Each lookup is one indexed
# read.
TOUCH_SECONDS = 60.0  # "last used" is recorded at most once a minute per key
CREATE_KEY_HINT = "{command} keys create --name NAME --scopes read,submit,work --database {url}"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: the key's name and scopes, or the local caller of protected mode."""

    name: str
    scopes: frozenset[str]
    anonymous: bool = False
    key_hash: str | None = field(default=None, repr=False)
    rate_limit: int | None = None  # the key's own requests a minute; None: the server's default

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


LOCAL = Principal(name="local", scopes=frozenset(SCOPES), anonymous=True)


# The scope each service operation needs, for every interface; `read` covers every read.
OPERATION_SCOPES = {
    "read": READ,
    "submit": SUBMIT,
    "cancel": SUBMIT,
    "retry": SUBMIT,
    "update": SUBMIT,
    "claim": WORK,
    "heartbeat": WORK,
    "report_progress": WORK,
    "append_log": WORK,
    "complete": WORK,
    "fail": WORK,
    "release": WORK,
    "approve": REVIEW,
    "reject": REVIEW,
    # Bulk changes and work-directory controls reach every task of a directory: admin only.
    "cancel_tasks": ADMIN,
    "retry_tasks": ADMIN,
    "configure_work_directory": ADMIN,
}


def scope_of(operation: str) -> str:
    """The scope `operation` needs; one nobody listed needs `admin`."""
    return OPERATION_SCOPES.get(operation, ADMIN)


def require(principal: Principal | None, operation: str) -> Principal:
    """Raise Unauthenticated without a principal, Forbidden when it may not run `operation`."""
    return require_scope(principal, scope_of(operation))


def require_scope(principal: Principal | None, scope: str) -> Principal:
    """Raise Unauthenticated without a principal, Forbidden when it lacks `scope`."""
    if principal is None:
        raise missing_key()
    if not principal.allows(scope):
        raise forbidden(principal.name, principal.scopes, scope)
    return principal


def principal_of(connection: Any) -> Principal | None:
    """The principal the middleware stored for a Starlette Request/WebSocket or an ASGI scope."""
    scope = connection if isinstance(connection, Mapping) else connection.scope
    state = scope.get("state") or {}
    principal = state.get("principal")
    return principal if isinstance(principal, Principal) else None


@functools.lru_cache(maxsize=4096)  # asked once per request; clients are few
def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def bearer(authorization: str) -> str:
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer KEY'")
    return credentials.strip()


class Gate:
    """Authentication and rate limits for one process, over the key table of `store`."""

    def __init__(
        self,
        store: TaskStore,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.database_url = settings.database_url
        self.max_tokens = settings.max_tokens
        self.limiter = RateLimiter(settings.rate_limit, clock=clock)
        self.clock = clock
        self.now = now
        self._touched: dict[str, float] = {}

    async def warn_if_protected(self) -> None:
        if await self.keys.count_active_keys() == 0:
            log.warning(
                "no API key exists, so only loopback clients are served (protected mode). "
                "Create a key with: %s",
                CREATE_KEY_HINT.format(command=command(), url=redact(self.database_url)),
            )

    async def protected(self) -> bool:
        """True while no active key exists."""
        return await self.keys.count_active_keys() == 0

    async def authenticate(self, authorization: str | None, client: str | None) -> Principal:
        """The principal for this Authorization value and client address, or Unauthenticated."""
        if authorization:
            principal = await self.by_hash(hash_key(bearer(authorization)))
            if principal is None:
                raise Unauthenticated("invalid or revoked API key")
            return principal
        if await self.protected():
            if is_loopback(client):
                return LOCAL
            raise Unauthenticated(
                "no API key exists yet, so this server only serves loopback clients; create one "
                f"with `{CREATE_KEY_HINT.format(command=command(), url='URL')}` and send 'Authorization: Bearer KEY'"
            )
        raise missing_key()

    async def still_valid(self, principal: Principal) -> bool:
        """Whether a principal resolved earlier (a WebSocket's) may still act: not revoked since."""
        if principal.key_hash is None:
            return principal.anonymous and (await self.protected())
        return await self.by_hash(principal.key_hash) is not None

    async def by_hash(self, key_hash: str) -> Principal | None:
        now = self.clock()
        key = await self.keys.find_key(key_hash)
        principal = None
        if key is not None and key.revoked_at is None:
            principal = Principal(
                key.name, frozenset(key.scopes), key_hash=key_hash, rate_limit=key.rate_limit
            )
            if now - self._touched.get(key_hash, -math.inf) >= TOUCH_SECONDS:
                self._touched[key_hash] = now
                await self.keys.touch_key(key_hash, self.now())
        return principal

    def charge(self, principal: Principal | None, client: str | None) -> float:
        """Spend one request of the caller's allowance; the seconds to wait when it is spent.

        The local caller of protected mode is not limited: it is the operator's own machine. A key
        made with its own limit spends that; every other caller the server's default.
        """
        if principal is None:
            return self.limiter.take(f"addr:{client}")
        if principal.anonymous:
            return 0.0
        return self.limiter.take(f"key:{principal.name}", principal.rate_limit)


def rate_limited(wait: float) -> RateLimited:
    """The error for a refused request; every refusal, HTTP or WebSocket, is built (and counted) here."""
    RATE_LIMITED.inc()
    seconds = max(1, math.ceil(wait))
    return RateLimited(f"rate limit exceeded: retry in {seconds} s", retry_after=seconds)


def error_body(path: str, error: TaskorchError) -> bytes:
    """The JSON an interface expects for an error raised before it ran."""
    if is_rest(path):
        body = envelope(None, error)
    else:
        body = {
            "data": None,
            "errors": [{"message": error.message, "extensions": error.extensions}],
        }
    return json.dumps(body).encode()


def error_headers(error: TaskorchError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if isinstance(error, Unauthenticated):
        headers.append((b"www-authenticate", b'Bearer realm="taskorch"'))
    if isinstance(error, RateLimited):
        headers.append((b"retry-after", error.retry_after_header.encode()))
    return headers


class _BodyTooLarge(Exception):
    pass


class AuthMiddleware:
    """Resolves the caller once per request or connection, before any interface sees it."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        open_paths: frozenset[str] = OPEN_PATHS,
        socket_paths: frozenset[str] = SOCKET_PATHS,
        is_open: Callable[[Scope], bool] = lambda scope: False,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths
        self.socket_paths = socket_paths
        self.is_open = is_open  # requests for public files, such as the GraphiQL page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (
            kind not in ("http", "websocket")
            or scope.get("path") in self.open_paths
            or self.is_open(scope)
        ):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        client = (scope.get("client") or (None,))[0]
        gate: Gate | None = getattr(getattr(scope.get("app"), "state", None), "gate", None)
        authorization = _header(scope, b"authorization")
        failure: Unauthenticated | None = None
        try:
            if gate is None:
                raise Unavailable("the server is starting or stopping; try again shortly")
            try:
                principal = await gate.authenticate(authorization, client)
            except Unauthenticated as error:
                principal, failure = None, error
            wait = gate.charge(principal, client)
            if wait:
                raise rate_limited(wait)
            if failure is not None and not (kind == "websocket" and path in self.socket_paths):
                raise failure
            if kind == "http":
                length = _header(scope, b"content-length")
                if length and length.isdigit() and int(length) > self.max_body_bytes:
                    raise self._too_large()
        except TaskorchError as error:
            await _refuse(scope, send, path, error)
            return
        except Exception:
            log.exception("could not authenticate a request")
            await _refuse(scope, send, path, Unavailable("the database did not answer; try again"))
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["gate"] = gate
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        await self._limited_body(scope, receive, send, path)

    async def _limited_body(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _refuse(scope, send, path, self._too_large())

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body exceeds {self.max_body_bytes:,} bytes (TASKORCH_MAX_BODY_BYTES)",
            details={"maxBytes": self.max_body_bytes},
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _refuse(scope: Scope, send: Send, path: str, error: TaskorchError) -> None:
    body = error_body(path, error)
    if scope["type"] == "websocket":
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": error.http_status,
                    "headers": error_headers(error),
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 4000 + error.http_status})
        return
    await send(
        {
            "type": "http.response.start",
            "status": error.http_status,
            "headers": [*error_headers(error), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
