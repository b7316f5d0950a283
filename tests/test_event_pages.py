"""The paged `events` query: stored history in id order, filtered, bounded, read scope."""

from __future__ import annotations

from typing import Any

from tests.conftest import GraphQLClient
from tests.test_security import code_of, post, secured

PAGE = """
query($after: ID, $first: Int!, $filter: EventFilterInput) {
  events(after: $after, first: $first, filter: $filter) {
    events { id taskId status previousStatus workerId workDirectory at details }
    lastId hasNextPage
  }
}
"""


async def submit(gql: GraphQLClient, directory: str, count: int) -> list[str]:
    inputs = [{"workDirectory": directory, "prompt": f"p{i}"} for i in range(count)]
    done = await gql.ok(
        "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }",
        inputs=inputs,
    )
    return [t["id"] for t in done["submitTasks"]]


async def all_pages(gql: GraphQLClient, first: int, **filters: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = None
    while True:
        page = (await gql.ok(PAGE, after=after, first=first, filter=filters or None))["events"]
        events += page["events"]
        if not page["hasNextPage"]:
            assert page["lastId"] == (events[-1]["id"] if events else after)
            return events
        after = page["lastId"]


async def test_events_pages_through_history_in_id_order(gql: GraphQLClient) -> None:
    ids = await submit(gql, "/a", 5)
    await submit(gql, "/b", 2)
    claimed = await gql.ok('mutation { claimTask(workDirectory: "/a", workerId: "w1") { id } }')
    task = claimed["claimTask"]["id"]
    await gql.ok(f'mutation {{ completeTask(id: "{task}", workerId: "w1") {{ id }} }}')
    # On PostgreSQL a page holds positioned events only, and an event gets its position a moment
    # after its commit; a task's history waits for its own, and every earlier one comes before it.
    history = await gql.ok(f'{{ task(id: "{task}") {{ history {{ id }} }} }}')
    assert len(history["task"]["history"]) == 3

    events = await all_pages(gql, first=3)
    assert len(events) == 7 + 2
    numbers = [int(e["id"]) for e in events]
    assert numbers == sorted(numbers)
    assert len(set(numbers)) == len(numbers)
    assert events[-1]["status"] == "COMPLETED"
    assert events[-1]["previousStatus"] == "WORKING"
    assert events[-1]["workerId"] == "w1"

    assert len(await all_pages(gql, first=1000, workDirectory="/b")) == 2
    mine = await all_pages(gql, first=2, taskId=task)
    assert [e["status"] for e in mine] == ["WAITING", "WORKING", "COMPLETED"]
    finished = await all_pages(gql, first=10, statuses=["COMPLETED", "WORKING"])
    assert [e["taskId"] for e in finished] == [task, task]
    assert task in ids

    last = events[-1]["id"]
    empty = (await gql.ok(PAGE, after=last, first=10))["events"]
    assert empty == {"events": [], "lastId": last, "hasNextPage": False}


async def test_events_refuses_bad_page_arguments(gql: GraphQLClient) -> None:
    too_many = await gql.error(PAGE, first=1001)
    assert "first must be from 1 to 1000" in too_many["message"]
    bad_after = await gql.error(PAGE, first=10, after="x")
    assert "after must be an event id" in bad_after["message"]
    bad_task = await gql.error(PAGE, first=10, filter={"taskId": "nope"})
    assert "taskId must be a task id" in bad_task["message"]


async def test_events_needs_the_read_scope(database_url: str) -> None:
    async with secured(database_url) as harness:
        worker = await harness.issue("worker", "work")
        reader = await harness.issue("reader", "read")
        query = "{ events(first: 5) { lastId hasNextPage } }"
        async with harness.client(worker) as client:
            assert code_of(await post(client, query)) == "FORBIDDEN"
        async with harness.client(reader) as client:
            answer = await post(client, query)
            assert answer.json()["data"]["events"] == {"lastId": None, "hasNextPage": False}
