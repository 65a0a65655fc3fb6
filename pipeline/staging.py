"""Hidden staging folders: where a store (or a teacher added to one) is built before it is renamed
into place, and how the ones left by killed creators are removed.

    .<store>.mtkd-staging-<host>.<pid>.<start>.<random>     a sibling of the store

The name records its creator: host, process id and the process's start time (Linux's
/proc/<pid>/stat, in clock ticks since boot; a reused pid has another start time). A folder is stale
when its creator ran on this host and that process is gone; the next process that creates or extends
the store removes it. A live creator's folder is never touched, so there is no race with it; a
folder made on another host (a shared file system) is left alone, because from here its creator's
state cannot be known.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

MARK = ".mtkd-staging-"
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (None: no such process, or no /proc to tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (the name in parentheses may hold spaces)


def staging_dir(target: Path) -> Path:
    """A new staging folder's path for `target`: a hidden sibling (same file system: rename is atomic)."""
    pid = os.getpid()
    return target.parent / f".{target.name}{MARK}{_HOST}.{pid}.{process_start(pid) or 'unknown'}.{uuid.uuid4().hex[:8]}"


def remove_stale(target: Path) -> list[Path]:
    """Remove the staging folders of `target` whose creator ran on this host and is gone; returns them."""
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}{MARK}*"):
        parts = path.name[len(f".{target.name}{MARK}") :].split(".")
        if len(parts) != 4 or parts[0] != _HOST or not parts[1].isdigit() or parts[2] == "unknown":
            continue  # another host's, an unparseable (older) name, or a creator we cannot check
        if process_start(int(parts[1])) != parts[2]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
