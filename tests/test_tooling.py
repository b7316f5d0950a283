"""The project's own files keep their promises: what the code imports is declared, and the lint
target checks everything `make test` relies on."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"api", "analytics", "bench", "tests"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions(package: str) -> set[str]:
    modules: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - OURS - set(sys.stdlib_module_names) - {"__future__"}
    found = packages_distributions()
    return {_name(found[module][0]) for module in third_party}


@pytest.mark.parametrize(("package", "extras"), [("api", ()), ("analytics", ("analytics",))])
def test_every_imported_distribution_is_declared(package: str, extras: tuple[str, ...]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in extras:
        declared |= {_name(r) for r in project["optional-dependencies"][extra]}
    assert _imported_distributions(package) - declared == set()


def test_lint_checks_and_format_checks_every_python_folder() -> None:
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    for command in ("ruff check", "ruff format --check"):
        line = next(line for line in lint.splitlines() if command in line)
        assert set(line.split(command, 1)[1].split()) == folders, command
    assert "mypy" in lint
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert set(mypy["packages"]) == folders - {"tests"}
    assert re.search(r"^test: lint$", makefile, re.MULTILINE)


def test_no_asyncio_wait_for_in_the_server() -> None:
    # On Python 3.11 `asyncio.wait_for` can lose a cancellation that arrives as the awaited thing
    # finishes, and a loop waiting in it then never stops; `asyncio.timeout` does not.
    users = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "api").rglob("*.py")
        if re.search(r"\bwait_for\(", path.read_text())
    ]
    assert users == []
