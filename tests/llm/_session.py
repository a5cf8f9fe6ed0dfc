"""Test helper: run an expensive step (a subprocess, spawned ranks) once per test session.

Under pytest-xdist each worker that gets a test needing the step asks for it; the workers share
one run through a lock file in the session's common temp folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def once_per_session(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    produce: Callable[[Path], None],
) -> Path:
    """Run ``produce(folder)`` once per session (shared by xdist workers); returns ``folder``."""
    worker = hasattr(request.config, "workerinput")  # the parent folder is then per session
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.mktemp(name)
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".done").exists():
            folder.mkdir(exist_ok=True)
            produce(folder)
            (folder / ".done").write_text("ok")
    return folder
