"""Temporary folders inside a cache folder that name their owner process, and the removal of dead owners' ones.

Caches are written into a temporary folder and renamed into place whole. A process that dies without
running its cleanup (SIGKILL, the out-of-memory killer, a kernel restarted from JupyterLab) leaves that
folder behind: ~21 MB of half-written base outputs for the demo model, 538 MB for a half-saved demo copy.
So each folder carries its owner in its name, ``<prefix><pid>-<start>-<host>-<random>`` (``start``: the
owner's start time in whole seconds, so that a later process reusing the pid is not taken for the owner;
``host``: 8 hex digits of the host name, for caches shared between machines), and
:func:`remove_leftovers` removes the folders whose owner is gone:

- same host: the pid is not running, or runs a process started at another time (the pid was reused);
- another host, or a folder written before owners were recorded (``<prefix>`` + mkdtemp's 8 random
  characters): only when untouched for :data:`MAX_AGE_S`, since its owner cannot be asked.

A folder whose owner runs is never removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil

MAX_AGE_S = 7 * 24 * 3600  # a week: far beyond any computation, for folders whose owner cannot be checked


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (whole seconds since the epoch); None when it does not run."""
    try:
        return int(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None
    except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return -1  # it runs, but its start cannot be read: treat it as the owner


def owned_tempdir(root: str | Path, prefix: str) -> Path:
    """A new private folder in ``root`` whose name records this process (see the module docstring)."""
    pid = os.getpid()
    start = _start_time(pid)
    stamp = f"{prefix}{pid}-{max(start or 0, 0)}-{_host_tag()}-"
    return Path(tempfile.mkdtemp(dir=root, prefix=stamp))


def _owner_alive(pid: int, start: int) -> bool:
    now = _start_time(pid)
    if now is None:
        return False
    # -1: unreadable start (kept); otherwise the same process within rounding of the stored second.
    return now == -1 or start == 0 or abs(now - start) <= 2


def remove_leftovers(root: str | Path, prefix: str, *, max_age_s: float = MAX_AGE_S) -> list[Path]:
    """Remove the temporary folders in ``root`` named ``<prefix>...`` whose owner process is gone.

    Returns the folders removed. Safe to call from several processes at once (a folder another process
    removes first is skipped).
    """
    root = Path(root)
    owned = re.compile(re.escape(prefix) + r"(\d+)-(\d+)-([0-9a-f]{8})-[A-Za-z0-9_]+")
    legacy = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}")  # tempfile.mkdtemp's names before owners
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    host, now, removed = _host_tag(), time.time(), []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = owned.fullmatch(entry.name)
        if match is None and legacy.fullmatch(entry.name) is None:
            continue  # someone else's naming that shares the prefix: not ours to judge
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if match is not None and match.group(3) == host:
            gone = not _owner_alive(int(match.group(1)), int(match.group(2)))
        else:
            gone = age > max_age_s
        if gone:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


__all__ = ["MAX_AGE_S", "owned_tempdir", "remove_leftovers"]
