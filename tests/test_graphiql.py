"""GraphiQL works without internet: headless Chromium, with every non-loopback address unreachable,
renders the editor from the server's own assets and runs a query through it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from api.interfaces.gql.ide import STATIC, graphiql_page
from tests.conftest import ServerProcess, free_port

REQUIRE_CHROMIUM = os.environ.get("TASKORCH_REQUIRE_CHROMIUM", "") not in ("", "0", "false")
CDN_URL = "https://unpkg.com/react@18.2.0/umd/react.production.min.js"
SUBMIT = 'mutation($p: String!) { submitTask(input: {workDirectory: "/r", prompt: $p}) { id } }'


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if REQUIRE_CHROMIUM:
        pytest.fail("Chromium is required (TASKORCH_REQUIRE_CHROMIUM) but none is on PATH")
    pytest.skip("no Chromium on PATH")


class DevTools:
    """Just enough of the Chrome DevTools protocol: calls on one page, and the events seen."""

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.connection = connection
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self.connection.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message: dict[str, Any] = json.loads(await asyncio.wait_for(self.connection.recv(), 30))
            if message.get("id") == call_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}")
            await asyncio.sleep(0.2)

    def requested_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]


@pytest.fixture
def offline_chromium(tmp_path: Path) -> Iterator[int]:
    """Headless Chromium that can reach loopback only; yields its DevTools port."""
    binary = chromium_binary()
    port = free_port()
    command = [
        binary,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--remote-debugging-port={port}",
        "--window-size=1400,900",
        # No name resolves and everything not on loopback goes to a closed port: a CDN is unreachable.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--proxy-server=http://127.0.0.1:{free_port()}",
        "about:blank",
    ]
    log = (tmp_path / "chromium.log").open("wb")
    browser = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        browser.terminate()
        try:
            browser.wait(15)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()
        log.close()


@contextlib.asynccontextmanager
async def page(port: int) -> AsyncIterator[DevTools]:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            try:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                pages = [t for t in targets if t["type"] == "page"]
                if pages:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("Chromium's DevTools did not come up")
            await asyncio.sleep(0.2)
    async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as connection:
        yield DevTools(connection)


async def test_graphiql_renders_and_runs_a_query_offline(
    tmp_path: Path, offline_chromium: int, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'taskorch.db'}")
    marker = f"offline-{os.getpid()}-{time.time_ns()}"
    async with httpx.AsyncClient(base_url=server.url) as http:
        submitted = await http.post("/graphql", json={"query": SUBMIT, "variables": {"p": marker}})
        assert not submitted.json().get("errors"), submitted.text
    query = "{ tasks { edges { node { prompt } } } }"
    url = f"{server.url}/graphql?q={urllib.parse.quote(query)}"

    async with page(offline_chromium) as tab:
        await tab.call("Network.enable")
        await tab.call("Page.enable")
        # The control: this browser cannot fetch what a CDN-based page would need.
        blocked = await tab.evaluate(
            f"fetch({json.dumps(CDN_URL)}).then(() => 'fetched', () => 'blocked')"
        )
        assert blocked == "blocked"

        await tab.call("Page.navigate", url=url)
        await tab.wait_for("document.querySelector('.graphiql-execute-button') !== null")
        assert await tab.evaluate("document.querySelector('.graphiql-query-editor').innerText")
        await tab.evaluate("document.querySelector('.graphiql-execute-button').click(); true")
        result = await tab.wait_for(
            f"(document.querySelector('.result-window') || {{}}).innerText?.includes({json.dumps(marker)})"
            " && document.querySelector('.result-window').innerText"
        )
        # The marker exists only in the server's database: the page asked, the server answered.
        assert '"prompt"' in result
        assert marker in result
        shot = await tab.call("Page.captureScreenshot", format="png")
        (tmp_path / "graphiql.png").write_bytes(base64.b64decode(shot["data"]))

        # Subscriptions use the graphql-ws client inside the vendored bundle, over the socket.
        subscription = "subscription { taskEvents { taskId status } }"
        await tab.call(
            "Page.navigate", url=f"{server.url}/graphql?q={urllib.parse.quote(subscription)}"
        )
        await tab.wait_for("document.querySelector('.graphiql-execute-button') !== null")
        await tab.evaluate("document.querySelector('.graphiql-execute-button').click(); true")
        result_text = "document.querySelector('.result-window').innerText"
        submitted_ids: list[str] = []
        # Submit until an event shows: the page opens its socket after the button reacts.
        async with httpx.AsyncClient(base_url=server.url) as http:
            for _ in range(60):
                reply = await http.post("/graphql", json={"query": SUBMIT, "variables": {"p": "p"}})
                submitted_ids.append(reply.json()["data"]["submitTask"]["id"])
                await asyncio.sleep(0.5)
                shown = await tab.evaluate(result_text)
                if any(i in shown for i in submitted_ids):
                    break
        live = await tab.evaluate(result_text)
        assert any(i in live for i in submitted_ids), live
        assert "WAITING" in live, live
        sockets = [e for e in tab.events if e.get("method") == "Network.webSocketCreated"]
        assert [e["params"]["url"] for e in sockets] == [server.ws_url]

        requested = [u for u in tab.requested_urls() if not u.startswith(("data:", "about:"))]
        loaded = [u for u in requested if u.startswith(f"{server.url}/graphiql/static/")]
        # React, ReactDOM, and GraphiQL and its explorer plugin, each a script and a stylesheet.
        assert len(set(loaded)) == 6, requested
        outside = [u for u in requested if not u.startswith(server.url) and u != CDN_URL]
        assert not outside, outside


def test_the_page_refers_to_local_assets_only() -> None:
    html = graphiql_page()
    assert "https://" not in html
    assert "http://" not in html
    for reference in ("react-18.2.0/react.production.min.js", "graphiql-3.8.3/graphiql.min.js"):
        assert f"graphiql/static/{reference}" in html


def test_every_vendored_asset_has_its_licence_beside_it() -> None:
    folders = [p for p in STATIC.iterdir() if p.is_dir()]
    assert len(folders) == 4, folders
    for folder in folders:
        assert (folder / "LICENSE").read_text().startswith("MIT License"), folder


def test_the_wheel_carries_the_page_and_its_assets(tmp_path: Path) -> None:
    # A clean copy: a build folder or egg-info left by the editable install would hide a mistake.
    source = tmp_path / "source"
    shutil.copytree(
        Path(__file__).parent.parent,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "*.db*"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("taskorch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = STATIC.parent
    expected = {"api/interfaces/gql/graphiql.html"} | {
        f"api/interfaces/gql/{p.relative_to(package).as_posix()}"
        for p in STATIC.rglob("*")
        if p.is_file()
    }
    assert len(expected) > 10
    assert expected <= names, sorted(expected - names)
