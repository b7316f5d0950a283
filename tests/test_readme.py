"""The README as a newcomer uses it: every snippet is run, in order, against a real server.

Conventions the README follows, so that its snippets can be run:
- A ```graphql block holding operations is one operation, sent to the server as it is. A ```graphql
  block holding type definitions is the schema's core; every field in it must exist on the server
  with the same arguments and types.
- A ```json variables block right after a ```graphql block holds that operation's variables.
- A ```json block right after a run snippet (only blank lines between) is its answer: the server's
  answer must have the same shape (the same keys; `"...": "..."` allows more), the same values, except
  that a string with `...` in it stands for any string (an id), and a date-time for any date-time.
- Such a placeholder, once answered, means that value from then on: `"4f7b1c9e-..."` in a later
  snippet is replaced by the id the server gave, so the snippets chain as a reader would chain them.
- Shell blocks are run command by command when the command is quick and safe (curl against the
  server, the operator commands); every other command must be one this file knows it skips.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import graphql
import httpx

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TASKORCH = (
    ".venv/bin/taskorch"  # the README's one way to run the command: it works after `make run`
)
RUN = {"curl", "mkdir"} | {
    f"{TASKORCH} {sub}" for sub in ("keys", "backup", "restore", "prune", "migrate", "export")
}
SKIP = {
    # long-running, or needing what a test machine has not (docker, an agent CLI, a cluster)
    "make", "docker", "kubectl", "claude", "pg_dump", "createdb", "pg_restore",
    ".venv/bin/python", ".venv/bin/pytest", ".venv/bin/jupyter",
    f"{TASKORCH} serve", f"{TASKORCH} work", f"{TASKORCH} demo", f"{TASKORCH} mcp",
}  # fmt: skip


@dataclass
class Block:
    info: str
    body: str
    line: int
    follows: bool  # only blank lines between this block and the one before


@dataclass
class Snippet:
    kind: str  # "graphql" or "sh"
    text: str
    line: int
    variables: dict[str, Any] | None = None
    answer: Any = None


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    previous_end = None
    for match in FENCE.finditer(text):
        between = text[previous_end : match.start()] if previous_end is not None else "x"
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(match[1].strip(), match[2], line, not between.strip()))
        previous_end = match.end()
    return found


def is_operation(document: graphql.DocumentNode) -> bool:
    kinds = {isinstance(d, graphql.ExecutableDefinitionNode) for d in document.definitions}
    assert len(kinds) == 1, "a graphql block holds operations or type definitions, not both"
    return kinds == {True}


def snippets(text: str) -> Iterator[Snippet | graphql.DocumentNode]:
    """The README's runnable snippets in order, each with its variables and shown answer; schema
    blocks as parsed documents."""
    found = blocks(text)
    index = 0
    while index < len(found):
        block = found[index]
        index += 1
        if block.info not in ("graphql", "sh"):
            continue
        if block.info == "graphql":
            document = graphql.parse(block.body)  # a syntax error fails here, naming the line
            if not is_operation(document):
                yield document
                continue
            operations = [
                d for d in document.definitions if isinstance(d, graphql.OperationDefinitionNode)
            ]
            assert len(operations) == 1, f"README line {block.line}: one operation per block"
        snippet = Snippet(block.info, block.body, block.line)
        nxt = found[index] if index < len(found) else None
        if nxt and nxt.follows and nxt.info == "json variables" and block.info == "graphql":
            snippet.variables = json.loads(nxt.body)
            index += 1
            nxt = found[index] if index < len(found) else None
        if nxt and nxt.follows and nxt.info == "json":
            snippet.answer = json.loads(nxt.body)
            index += 1
        yield snippet


def commands(script: str) -> list[str]:
    """Logical shell commands: lines joined across `\\` and open single quotes; comments dropped."""
    result: list[str] = []
    current = ""
    for line in script.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current = f"{current}\n{line}" if current else line
        if current.endswith("\\") or current.count("'") % 2:
            continue
        result.append(current)
        current = ""
    assert not current, f"unterminated shell command: {current}"
    return result


def program(line: str) -> str:
    """The command a shell line runs (`VAR=value` prefixes skipped), with its subcommand for
    taskorch."""
    words = [w for w in line.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    if words[0] == TASKORCH and len(words) > 1:
        return f"{TASKORCH} {words[1]}"
    return words[0]


def is_datetime(value: str) -> bool:
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value


class Walk:
    """Runs snippets in order and remembers what each placeholder turned out to be."""

    def __init__(self, server: ServerProcess, database_url: str, tmp_path: Path) -> None:
        self.server = server
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.seen: dict[str, Any] = {}

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.seen.get(value, value)
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value

    def fill_text(self, text: str) -> str:
        for placeholder, value in self.seen.items():
            text = text.replace(json.dumps(placeholder), json.dumps(value))
        return text

    def match(self, shown: Any, actual: Any, where: str) -> None:
        if isinstance(shown, dict):
            assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
            keys = set(shown) - {"..."}
            if "..." in shown:
                assert keys <= set(actual), f"{where}: missing {keys - set(actual)}"
            else:
                assert keys == set(actual), f"{where}: keys {sorted(actual)} != {sorted(keys)}"
            for key in keys:
                self.match(shown[key], actual[key], f"{where}.{key}")
        elif isinstance(shown, list):
            assert isinstance(actual, list), f"{where}: {actual!r}"
            assert len(actual) == len(shown), f"{where}: {actual!r}"
            for i, (s, a) in enumerate(zip(shown, actual, strict=True)):
                self.match(s, a, f"{where}[{i}]")
        elif isinstance(shown, str) and "..." in shown:
            assert isinstance(actual, str), f"{where}: expected a string, got {actual!r}"
            if shown in self.seen:  # the same placeholder means the same value: the chain holds
                assert self.seen[shown] == actual, f"{where}: {actual!r} is not {shown}"
            self.seen[shown] = actual
        elif isinstance(shown, str) and is_datetime(shown):
            assert isinstance(actual, str), f"{where}: {actual!r}"
            assert is_datetime(actual), f"{where}: {actual!r}"
        else:
            assert type(shown) is type(actual), f"{where}: {actual!r}"
            assert shown == actual, f"{where}: {actual!r}"

    def graphql(self, snippet: Snippet) -> None:
        body = {"query": self.fill_text(snippet.text), "variables": self.fill(snippet.variables)}
        answer = httpx.post(f"{self.server.url}/graphql", json=body, timeout=60).json()
        assert not answer.get("errors"), f"README line {snippet.line}: {answer['errors']}"
        if snippet.answer is not None:
            self.match(snippet.answer, answer, f"README line {snippet.line}")

    def shell(self, snippet: Snippet, ran: list[str]) -> None:
        for line in commands(snippet.text):
            name = program(line)
            assert not name.startswith("taskorch"), (
                f"README line {snippet.line}: `{name}` is not on PATH after `make run`;"
                f" write {TASKORCH}"
            )
            if name in SKIP:
                continue
            assert name in RUN, f"README line {snippet.line}: unknown command {name!r}"
            ran.append(name)
            output = self.run(line, name)
            if name == "curl":
                answer = json.loads(output)
                assert not answer.get("errors"), answer
                assert answer.get("success", True), answer
                if snippet.answer is not None:
                    self.match(snippet.answer, answer, f"README line {snippet.line}")

    def run(self, line: str, name: str) -> str:
        # The server is still running, and restore refuses a database in use: restore into a
        # new file instead, which runs every check the README describes.
        target = (
            f"sqlite:///{self.tmp_path / 'restored.db'}"
            if name.endswith(" restore")
            else self.database_url
        )
        script = (
            line.replace("http://127.0.0.1:8080", self.server.url)
            .replace("sqlite:///./taskorch.db", target)
            .replace(TASKORCH, taskorch_command())
        )
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=self.tmp_path
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        return done.stdout


def taskorch_command() -> str:
    script = ROOT / TASKORCH
    return str(script) if script.exists() else f"{sys.executable} -m api.cli"


def type_text(node: graphql.TypeNode) -> str:
    if isinstance(node, graphql.NonNullTypeNode):
        return f"{type_text(node.type)}!"
    if isinstance(node, graphql.ListTypeNode):
        return f"[{type_text(node.type)}]"
    assert isinstance(node, graphql.NamedTypeNode)
    return node.name.value


def check_schema(document: graphql.DocumentNode, server: ServerProcess) -> int:
    """Every field the README's schema block lists exists with the arguments and types shown."""
    introspection = httpx.post(
        f"{server.url}/graphql", json={"query": graphql.get_introspection_query()}, timeout=60
    ).json()["data"]
    schema = graphql.build_client_schema(introspection)
    checked = 0
    for definition in document.definitions:
        assert isinstance(definition, graphql.ObjectTypeDefinitionNode)
        served = schema.get_type(definition.name.value)
        assert isinstance(served, graphql.GraphQLObjectType), definition.name.value
        for field in definition.fields or ():
            where = f"{definition.name.value}.{field.name.value}"
            assert field.name.value in served.fields, f"README lists {where}; the server has not"
            real = served.fields[field.name.value]
            assert str(real.type) == type_text(field.type), f"{where}: {real.type}"
            shown = {a.name.value: type_text(a.type) for a in field.arguments or ()}
            assert shown == {n: str(a.type) for n, a in real.args.items()}, where
            checked += 1
    return checked


def test_every_readme_snippet_runs_in_order_against_a_real_server(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    database_url = f"sqlite:///{tmp_path / 'taskorch.db'}"
    server = start_server(database_url)
    walk = Walk(server, database_url, tmp_path)
    ran: list[str] = []
    operations = schema_fields = 0
    for snippet in snippets(README.read_text()):
        if isinstance(snippet, graphql.DocumentNode):
            schema_fields += check_schema(snippet, server)
        elif snippet.kind == "graphql":
            walk.graphql(snippet)
            operations += 1
        else:
            walk.shell(snippet, ran)
    # The walk covered what a newcomer does first: every kind of snippet ran at least once.
    assert operations >= 3, (operations, schema_fields)
    assert schema_fields >= 10, (operations, schema_fields)
    assert {"curl", f"{TASKORCH} keys", f"{TASKORCH} backup", f"{TASKORCH} prune"} <= set(ran)
    assert "4f7b1c9e-..." in walk.seen  # the submitted task's id chained through the snippets


def test_readme_and_hints_never_say_a_bare_taskorch_command() -> None:
    """`taskorch` is not on PATH after `make run`: every command a reader may copy says how to run
    it from the clone (inline code with flags counts: it is copied too)."""
    text = README.read_text()
    bare = re.compile(r"^(?:[A-Z_]+=\S+\s+)*taskorch\s", re.MULTILINE)
    for block in blocks(text):
        if block.info == "sh":
            found = [line for line in commands(block.body) if bare.match(line)]
            assert not found, f"README line {block.line}: {found}"
    prose = FENCE.sub("", text)
    inline = [span for span in re.findall(r"`([^`\n]+)`", prose) if " --" in span]
    assert not [span for span in inline if bare.match(span)]
    # The hints the program itself prints name the command the same way.
    refused = subprocess.run(
        [sys.executable, "-m", "api.cli", "work", "--work-directory", "/srv/repo"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert refused.returncode == 2
    assert f"e.g. {TASKORCH} work ..." in refused.stderr
