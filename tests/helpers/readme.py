"""The README's commands, as a user copies them (tests follow them literally)."""

from __future__ import annotations

import re
import shlex

from tests.helpers import BIN, REPO_ROOT

README = REPO_ROOT / "README.md"


def readme_command(start: str) -> str:
    """The README's inline command that starts with `start` (a code span, maybe wrapped
    over lines: its whitespace is collapsed)."""
    prose = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = " ".join(prose.split())
    found = [c for c in re.findall(r"`([^`]+)`", text) if c.startswith(start)]
    assert found, f"README.md names no command starting with {start!r}"
    return found[0]


def as_argv(command: str) -> list[str]:
    """`uv run tool args...` as this venv's tool with the same arguments."""
    argv = shlex.split(command)
    if argv[:2] == ["uv", "run"]:
        argv = [str(BIN / argv[2]), *argv[3:]]
    return argv
