"""Server processes for a run: `taskorch serve` on a fresh database (one or several processes on it),
the floor app, readiness, CPU and resident memory read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

POSTGRES_URL = os.environ.get(
    "TASKORCH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# Anonymous runs measure the server alone; a run with keys on keeps the default rate limit.
SERVER_ENV = {"TASKORCH_RATE_LIMIT": "0"}
KEYED_SERVER_ENV: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One server process; its log goes to a file so a full pipe can never stall it."""

    command: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        out = self.log.open("wb")
        self.process = subprocess.Popen(
            self.command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        out.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """The server and its worker processes (`serve --workers`), which do the serving."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return [self.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        return total

    def rss_kb(self) -> int:
        """The largest resident set of its processes: the per-process figure."""
        largest = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
                largest = max(largest, pages * PAGE_KB)
        return largest


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (all cores, not idle)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def taskorch_server(
    database_url: str, durability: str, workdir: Path, keyed: bool = False, workers: int = 1
) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "api.cli", "serve", "--port", str(port),
        "--database", database_url, "--durability", durability, "--workers", str(workers),
    ]  # fmt: skip
    env = dict(KEYED_SERVER_ENV if keyed else SERVER_ENV)
    return Server(command, port, workdir / f"server-{port}.log", env)


def floor_server(workdir: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "bench.floor_app", "--port", str(port)]
    return Server(command, port, workdir / f"floor-{port}.log")


def migrate(database_url: str) -> None:
    """Create the schema with the server's own migrations (`taskorch migrate`)."""
    subprocess.run(
        [sys.executable, "-m", "api.cli", "migrate", "--database", database_url],
        check=True,
        capture_output=True,
        env={**os.environ, **SERVER_ENV},
    )


def create_key(database_url: str, name: str = "bench-fleet") -> str:
    """A key for every scope the scenarios use, made as an operator does (`taskorch keys create`),
    with the server's default rate limit; the raw key."""
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "keys", "create", "--name", name,
         "--scopes", "read,submit,work", "--database", database_url],
        check=True, capture_output=True, text=True, env={**os.environ, **SERVER_ENV},
    )  # fmt: skip
    return done.stdout.strip()


def sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.db'}"


class PostgresSchema:
    """A fresh schema on the local PostgreSQL, selected through the URL, dropped afterwards."""

    def __init__(self, base_url: str = POSTGRES_URL) -> None:
        self.base_url = base_url
        self.schema = f"bench_{uuid.uuid4().hex[:12]}"
        separator = "&" if "?" in base_url else "?"
        self.url = f"{base_url}{separator}options=-csearch_path%3D{self.schema}"

    def _admin(self, statement: str) -> None:
        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(self.base_url)
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(run())

    def create(self) -> str:
        self._admin(f"CREATE SCHEMA {self.schema}")
        return self.url

    def drop(self) -> None:
        self._admin(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="taskorch-bench-"))
