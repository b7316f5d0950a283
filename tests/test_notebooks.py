"""The notebooks run top to bottom against a demo database, in a kernel of this interpreter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from api.cli.demo import run_demo

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    import asyncio

    url = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'demo.db'}"
    asyncio.run(run_demo(url, 300, days=3))
    return url


@pytest.fixture
def kernel_env(tmp_path: Path, demo_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec for this very interpreter (the venv's), found through JUPYTER_PATH."""
    spec = tmp_path / "kernels" / "taskorch-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "taskorch tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("TASKORCH_DATABASE_URL", demo_url)
    return "taskorch-test"


def execute(name: str, kernel: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in notebook.cells
        if cell.cell_type == "code"
    ), f"{name} is committed with outputs; clear them"
    client = NotebookClient(
        notebook, kernel_name=kernel, timeout=180, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict[str, object]]:
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def test_quickstart_loads_and_draws(kernel_env: str, demo_url: str) -> None:
    notebook = execute("quickstart.ipynb", kernel_env)
    found = outputs(notebook)
    assert not [o for o in found if o.get("output_type") == "error"]
    texts = " ".join(str(o.get("text", "")) for o in found)
    assert "300 tasks" in texts
    images = [o for o in found if "image/png" in o.get("data", {})]  # type: ignore[operator]
    assert len(images) >= 2


def test_dashboard_notebook_shows_the_widget(kernel_env: str) -> None:
    notebook = execute("dashboard.ipynb", kernel_env)
    found = outputs(notebook)
    assert not [o for o in found if o.get("output_type") == "error"]
    view = "application/vnd.jupyter.widget-view+json"
    assert [o for o in found if view in o.get("data", {})]  # type: ignore[operator]
