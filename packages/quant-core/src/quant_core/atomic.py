"""Temporary names for atomic writes (write a temp beside the target, then rename it over the target).

A temp is named ``.<target name>.<pid>.<random>.quant-tmp`` so that one left behind by a killed
process (``kill -9`` during ``mtq.save`` or an export) is easy to spot, and each new write to the
same target first removes the leftovers of processes that are no longer running on this machine.
Only names of exactly that form are ever removed; a temp of a live process is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["SUFFIX", "atomic_temp", "remove_leftovers"]

SUFFIX = ".quant-tmp"


def _pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[a-z0-9_]+{re.escape(SUFFIX)}$")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another write of this process (a thread) may own it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temps of earlier writes to ``target`` whose process is gone; returns what was removed."""
    target = Path(target)
    pattern, removed = _pattern(target), []
    parent = target.parent if str(target.parent) else Path(".")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _running(int(match.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue  # removed meanwhile, or not ours to remove: leave it
    return removed


def atomic_temp(target: str | os.PathLike[str], directory: bool = False) -> Path:
    """Create an empty temp file (or folder) beside ``target`` for an atomic write, after removing leftovers."""
    target = Path(target)
    remove_leftovers(target)
    prefix, parent = f".{target.name}.{os.getpid()}.", target.parent
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=SUFFIX, dir=parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=SUFFIX, dir=parent)
    os.close(fd)
    return Path(tmp)
