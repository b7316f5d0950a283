"""How hints name the `taskorch` command, so that a pasted hint runs from where it was read."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def command() -> str:
    """How to run this installation's `taskorch` from the current directory, for hints that are
    copied and pasted: the bare name only when it is on PATH (an activated virtualenv, a container),
    else the installed script's path (`.venv/bin/taskorch` after `make run`)."""
    script = Path(sys.executable).with_name("taskorch")
    if not script.is_file():
        return f"{sys.executable} -m api.cli"
    found = shutil.which("taskorch")
    if found is not None and Path(found).resolve() == script.resolve():
        return "taskorch"
    try:
        return str(script.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(script.absolute())
