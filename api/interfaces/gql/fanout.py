"""Shared live subscriptions: sockets subscribing with the same document, operation and variables,
and replaying nothing, share one execution. Each event is executed and encoded once and the same
text goes to every one of them; a subscriber only adds the cost of its own send.

A member that falls `buffer` events behind is cut off with the same SLOW_SUBSCRIBER error, and the
same `resumeAfter`, as an unshared subscription; the others go on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    OperationType,
    VariableNode,
    get_operation_ast,
)
from strawberry.types.execution import ExecutionResult, PreExecutionError

from api.core.errors import internal_error
from api.events.bus import slow_subscriber
from api.interfaces.gql.context import Context

log = logging.getLogger("taskorch.graphql")

SHARED_FIELDS = frozenset({"taskEvents"})


@dataclass(frozen=True, slots=True)
class Key:
    query: str
    operation_name: str | None
    variables: str  # canonical JSON


def shareable(
    document: DocumentNode, query: str, operation_name: str | None, variables: dict[str, Any]
) -> Key | None:
    """The key under which this subscription may share, or None: it must be one live root field
    with no `after` replay (a replay is each subscriber's own)."""
    operation = get_operation_ast(document, operation_name)
    if operation is None or operation.operation is not OperationType.SUBSCRIPTION:
        return None
    (selection, *rest) = operation.selection_set.selections
    if rest or not isinstance(selection, FieldNode) or selection.name.value not in SHARED_FIELDS:
        return None
    for argument in selection.arguments or ():
        if argument.name.value != "after":
            continue
        value = argument.value
        if not isinstance(value, VariableNode) or variables.get(value.name.value) is not None:
            return None
    try:
        canonical = json.dumps(variables, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return Key(query, operation_name, canonical)


@dataclass(frozen=True, slots=True)
class Final:
    """What ends a member's stream: `next` with errors then `complete` (an error while live), or one
    `error` message (the operation never started); `payload` is None for a plain `complete`."""

    kind: str  # "next" or "error"
    payload: Any


@dataclass(eq=False)
class Member:
    """One socket's share: the encoded payloads not yet sent, with the event id each carries.

    A list and a future made only while the socket waits, rather than a deque and an Event: each
    of those holds a block of its own (~1.3 KB together), which 1,000 sockets pay for idle."""

    buffer: int
    pending: list[tuple[int | None, str]] = field(default_factory=list)
    waiter: asyncio.Future[None] | None = None
    final: Final | None = None

    def offer(self, event_id: int | None, payload: str) -> None:
        if self.final is not None:
            return
        if len(self.pending) >= self.buffer:
            # Everything before the oldest unsent event reached the subscriber.
            oldest = self.pending[0][0]
            resume_after = (oldest if oldest is not None else event_id or 1) - 1
            self.pending.clear()
            error = slow_subscriber(self.buffer, resume_after)
            slow = GraphQLError(error.message, extensions=error.extensions)
            self.final = Final("next", _errors([slow], data=True))
        else:
            self.pending.append((event_id, payload))
        self._wake()

    def end(self, final: Final) -> None:
        if self.final is None:
            self.final = final
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def payloads(self) -> AsyncIterator[str]:
        """The `next` payloads for this socket, in order, until `final` is set and all are sent."""
        while True:
            while self.pending:
                yield self.pending.pop(0)[1]  # at most `buffer` entries, mostly one
            if self.final is not None:
                return
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class Group:
    """One execution shared by its members."""

    def __init__(self, fanout: Fanout, key: Key, context: Context) -> None:
        self.fanout = fanout
        self.key = key
        self.context = context
        self.members: set[Member] = set()
        self.task: asyncio.Task[None] | None = None

    async def run(self, variables: dict[str, Any], encode: Callable[[object], str | bytes]) -> None:
        final = Final("next", None)
        try:
            source = await self.fanout.schema.stream(
                self.key.query,
                variable_values=variables,
                context_value=self.context,
                operation_name=self.key.operation_name,
            )
            async with aclosing(source):
                async for result in source:
                    if isinstance(result, PreExecutionError) or not isinstance(
                        result, ExecutionResult
                    ):
                        errors = list(result.errors or ()) or [
                            GraphQLError("this subscription cannot be delivered over a socket")
                        ]
                        final = Final("error", _errors(errors, data=False))
                        return
                    encoded = encode(_payload(result))
                    payload = encoded if isinstance(encoded, str) else encoded.decode()
                    for member in list(self.members):
                        member.offer(self.context.delivered, payload)
        except Exception:
            log.exception("a shared subscription failed")
            internal = internal_error()
            failed = GraphQLError(internal.message, extensions=internal.extensions)
            final = Final("next", _errors([failed], data=True))
        finally:
            self.fanout.forget(self)
            for member in list(self.members):
                member.end(final)


class Fanout:
    """The groups of one server process, by key."""

    def __init__(self, schema: Any, buffer: int) -> None:
        self.schema = schema
        self.buffer = buffer
        self.groups: dict[Key, Group] = {}

    @property
    def sharing(self) -> int:
        """Subscribers beyond the first of each group: they hold no subscription of their own."""
        return sum(len(g.members) - 1 for g in self.groups.values() if g.members)

    def forget(self, group: Group) -> None:
        if self.groups.get(group.key) is group:
            del self.groups[group.key]

    @contextlib.asynccontextmanager
    async def join(
        self,
        key: Key,
        context: Context,
        variables: dict[str, Any],
        encode: Callable[[object], str | bytes],
    ) -> AsyncIterator[Member]:
        group = self.groups.get(key)
        if group is None:
            group = Group(self, key, replace(context, response=None, delivered=None))
            self.groups[key] = group
            group.task = asyncio.create_task(group.run(variables, encode))
        member = Member(self.buffer)
        group.members.add(member)
        try:
            yield member
        finally:
            group.members.discard(member)
            if not group.members:
                self.forget(group)
                if group.task is not None:
                    group.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await group.task


def _payload(result: ExecutionResult) -> dict[str, Any]:
    payload: dict[str, Any] = {"data": result.data}
    if result.errors:
        payload["errors"] = [error.formatted for error in result.errors]
    if result.extensions:
        payload["extensions"] = result.extensions
    return payload


def _errors(errors: list[GraphQLError], *, data: bool) -> Any:
    """A `next` payload of errors (`data: null`), or the list an `error` message carries."""
    formatted = [error.formatted for error in errors]
    return {"data": None, "errors": formatted} if data else formatted
