"""The reference worker as a real process against a real server, running a real script per task."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess

on_sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

SCRIPT = """
import os, pathlib, sys, time
prompt = sys.stdin.read()
assert prompt == os.environ["TASKORCH_PROMPT"], "stdin and the environment disagree"
pathlib.Path("ran-" + os.environ["TASKORCH_TASK_ID"]).write_text(prompt)
with open("feedback-" + os.environ["TASKORCH_TASK_ID"], "a") as feedback:
    print(os.environ.get("TASKORCH_REVIEW_FEEDBACK", "<none>"), file=feedback)
print("out:" + prompt)
word, _, arg = prompt.partition(" ")
if word == "fail":
    print("something broke", file=sys.stderr)
    sys.exit(3)
if word == "sleep":
    time.sleep(float(arg))
if word == "lines":
    for n in range(int(arg)):
        print(f"line {n}", flush=n % 100 == 0)
        if n == 10:
            print("::progress 0.5 halfway", flush=True)
            print("a warning", file=sys.stderr, flush=True)
            time.sleep(0.7)  # one batch goes by time, the rest by size
    print("no newline at the end", end="")
"""

Worker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "repo"
    directory.mkdir()
    (tmp_path / "script.py").write_text(SCRIPT)
    return directory


@pytest.fixture
def start_worker(server: ServerProcess, workdir: Path) -> Iterator[Worker]:
    workers: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "api.cli", "work", "--server", server.url,
            "--work-directory", str(workdir), "--worker-id", "w1", *flags,
            "--", sys.executable, str(workdir.parent / "script.py"),
        ]  # fmt: skip
        with (workdir.parent / "worker.log").open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        workers.append(process)
        return process

    yield start
    for process in workers:
        if process.poll() is None:
            process.kill()
            process.wait()


def submit(server: ServerProcess, workdir: Path, prompt: str, **fields: Any) -> str:
    body = {"work_directory": str(workdir), "prompt": prompt, **fields}
    response = httpx.post(f"{server.url}/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    task_id: str = response.json()["data"]["id"]
    return task_id


def get(server: ServerProcess, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = httpx.get(f"{server.url}/api/v1/tasks/{task_id}").json()["data"]
    return task


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def finished(server: ServerProcess, *ids: str) -> Callable[[], bool]:
    return lambda: all(get(server, i)["status"] in ("COMPLETED", "FAILED") for i in ids)


@on_sqlite
def test_completes_and_fails_real_tasks_and_heartbeats_past_the_lease(
    server: ServerProcess, workdir: Path, start_worker: Worker
) -> None:
    ok = submit(server, workdir, "hello world")
    broken = submit(server, workdir, "fail now", max_retries=0)
    long = submit(server, workdir, "sleep 5")  # lease 2 s: alive only thanks to heartbeats
    start_worker("--concurrency", "3", "--lease-seconds", "2")
    wait_for(finished(server, ok, broken, long))

    done = get(server, ok)
    assert done["status"] == "COMPLETED"
    assert done["worker_id"] == "w1"
    assert done["result"]["exit_code"] == 0
    assert done["result"]["stdout_tail"] == "out:hello world\n"
    assert done["result"]["duration_seconds"] >= 0
    assert (workdir / f"ran-{ok}").read_text() == "hello world"  # ran in the work directory

    failed = get(server, broken)
    assert failed["status"] == "FAILED"
    assert "exited with code 3" in failed["error_message"]
    assert "something broke" in failed["error_message"]

    survived = get(server, long)
    assert survived["status"] == "COMPLETED"
    assert survived["retry_count"] == 0
    history = httpx.post(
        f"{server.url}/graphql",
        json={
            "query": "query($id: ID!) { task(id: $id) { history { status } } }",
            "variables": {"id": long},
        },
    ).json()["data"]["task"]["history"]
    assert [e["status"] for e in history] == ["WAITING", "WORKING", "COMPLETED"]  # never requeued


def test_output_lines_stream_to_the_task_log_and_progress_lines_report_progress(
    server: ServerProcess, workdir: Path, start_worker: Worker
) -> None:
    task_id = submit(server, workdir, "lines 2500")
    start_worker()
    wait_for(finished(server, task_id))
    task = get(server, task_id)
    assert task["status"] == "COMPLETED", task
    assert task["progress"] == 0.5
    assert task["progress_message"] == "halfway"
    texts: list[str] = []
    after = 0
    while True:
        params = {"after": after, "first": 1000}
        page = httpx.get(f"{server.url}/api/v1/tasks/{task_id}/logs", params=params).json()
        texts += [line["text"] for line in page["data"]["lines"]]
        after = page["data"]["last_line"]
        if not page["data"]["has_more"]:
            break
    assert after == task["log_line_count"] == 2503
    assert "[stderr] a warning" in texts
    stdout = [t for t in texts if not t.startswith("[stderr] ")]
    assert stdout == [
        "out:lines 2500",
        *(f"line {n}" for n in range(2500)),
        "no newline at the end",
    ]


def test_no_logs_sends_no_lines(server: ServerProcess, workdir: Path, start_worker: Worker) -> None:
    task_id = submit(server, workdir, "lines 20")
    start_worker("--no-logs")
    wait_for(finished(server, task_id))
    task = get(server, task_id)
    assert task["status"] == "COMPLETED"
    assert task["log_line_count"] == 0
    assert task["progress"] is None


@on_sqlite
def test_the_next_attempt_after_a_rejection_gets_the_review_feedback(
    server: ServerProcess, workdir: Path, start_worker: Worker
) -> None:
    task_id = submit(server, workdir, "hello", require_review=True)
    start_worker()
    wait_for(lambda: get(server, task_id)["status"] == "IN_REVIEW")
    response = httpx.post(
        f"{server.url}/api/v1/tasks/{task_id}/reject", json={"feedback": "say it louder"}
    )
    assert response.status_code == 200, response.text
    wait_for(lambda: get(server, task_id)["status"] == "IN_REVIEW")
    runs = (workdir / f"feedback-{task_id}").read_text().splitlines()
    assert runs == ["<none>", "say it louder"]


@on_sqlite
def test_a_command_past_its_timeout_is_killed_and_failed(
    server: ServerProcess, workdir: Path, start_worker: Worker
) -> None:
    slow = submit(server, workdir, "sleep 60", max_retries=0)
    start_worker("--timeout", "1")
    wait_for(finished(server, slow))
    task = get(server, slow)
    assert task["status"] == "FAILED"
    assert "timed out after 1 s" in task["error_message"]


@on_sqlite
def test_sigterm_finishes_short_work_and_releases_the_rest(
    server: ServerProcess, workdir: Path, start_worker: Worker
) -> None:
    short = submit(server, workdir, "sleep 1.5")
    endless = submit(server, workdir, "sleep 120")
    worker = start_worker("--concurrency", "2", "--grace-seconds", "3")
    wait_for(lambda: all(get(server, i)["status"] == "WORKING" for i in (short, endless)))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, (workdir.parent / "worker.log").read_text()

    assert get(server, short)["status"] == "COMPLETED"  # finished within the grace period
    released = get(server, endless)
    assert released["status"] == "WAITING"
    assert released["worker_id"] is None
    assert released["retry_count"] == 0  # a release is not a failed attempt
    working = httpx.get(f"{server.url}/api/v1/tasks", params={"status": "WORKING"}).json()
    assert working["data"]["total"] == 0


def test_bad_flags_are_refused_before_starting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "work", "--work-directory", "relative", "--", "true"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"absolute" in result.stderr


@on_sqlite
def test_worker_logs_task_starts_and_ends_not_each_http_request(
    server: ServerProcess, workdir: Path, start_worker: Worker
) -> None:
    ok = submit(server, workdir, "hello")
    broken = submit(server, workdir, "fail now", max_retries=0)
    worker = start_worker()
    wait_for(finished(server, ok, broken))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    log = (workdir.parent / "worker.log").read_text()
    info = [line for line in log.splitlines() if " INFO " in line]
    assert not [line for line in info if "httpx" in line or "HTTP Request" in line], log
    assert any(f"running task {ok}" in line for line in info), log
    assert any(f"task {ok} completed in" in line for line in info), log
    assert any(f"task {broken} failed: command exited with code 3" in line for line in info), log


def test_work_help_shows_the_defaults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "work", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps help; compare without the wrapping
    assert "--server SERVER server URL (default http://127.0.0.1:8080)" in text
    assert "--timeout TIMEOUT seconds before a command is killed and failed (default: none" in text
    assert "--concurrency CONCURRENCY commands run at once (default 1)" in text
    assert "--lease-seconds LEASE_SECONDS lease per heartbeat, seconds (default 300)" in text
