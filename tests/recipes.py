"""The recipes of docs/recipes.md, read from the page itself, and what running them needs.

The tests execute a recipe's code block as the page prints it (``recipe``), so
the page and what was tested cannot drift apart: change the page and the tests
run the change.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes.md"
# scripts/stack.sh starts this Redis (RWDB_STACK_REDIS_PORT, 6380 by default)
REDIS = f"redis://127.0.0.1:{os.environ.get('RWDB_STACK_REDIS_PORT', '6380')}"

_BLOCK = re.compile(r"^```(?P<lang>\w+)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def recipe(first_line: str) -> str:
    """The code block of docs/recipes.md whose first line is ``first_line``."""
    found = [
        m["code"]
        for m in _BLOCK.finditer(RECIPES.read_text())
        if m["code"].startswith(first_line + "\n")
    ]
    if len(found) != 1:
        raise LookupError(
            f"docs/recipes.md has {len(found)} code blocks starting with {first_line!r}, "
            "expected exactly one: the tests find each recipe by its first line"
        )
    return found[0]


def worker_env() -> dict[str, str]:
    """The test process's environment (its POSTGRES_DB is the test database), with
    the repository importable, for a worker process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 15 s: a worker never outlives its test."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def wait_for(check: object, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``check()`` for 30 s; fail with the worker's log when it exits or never gets there."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the worker exited ({process.returncode}):\n{log_tail(log)}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within 30 s:\n{log_tail(log)}")
