"""Files that survive a crash: atomic JSON writes, and owner tags naming who wrote a temporary file
(checkable after a crash; imports nothing heavy). Every layer writes through here.

A tag is ``{host}-{pid}-{start}-{random}``: a hash of the host name, the writer's pid, its start time in clock
ticks since boot (Linux /proc; 0 elsewhere) and 8 random hex digits. :func:`owner_gone` is True only when
the owner is certainly dead: same host, and its pid is not running or now belongs to a process started at
another time (pid reuse). Siblings of other hosts are never judged dead.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any


def host_id() -> str:
    """8 hex digits naming this host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tag() -> str:
    """``{host}-{pid}-{start}-{random}``: who wrote a temporary sibling, checkable after a crash."""
    return f"{host_id()}-{os.getpid()}-{start_time(os.getpid()) or 0}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(owner: str) -> bool:
    """True when the writer named by ``owner`` (see :func:`owner_tag`; older ``{pid}-{random}`` too) is
    certainly dead: same host, and its pid is not running or now runs a process started at another time."""
    parts = owner.split("-")
    if len(parts) == 2 and parts[0].isdigit():  # soce <= 0.x: pid only, this host assumed
        pid, start = int(parts[0]), None
    elif len(parts) == 4 and parts[1].isdigit():
        if parts[0] != host_id():
            return False
        pid, start = int(parts[1]), parts[2]
    else:
        return False
    if pid == os.getpid():
        return False
    if not _pid_alive(pid):
        return True
    now = start_time(pid)
    return start not in (None, "0") and now is not None and now != start


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary sibling ``.{name}.{owner}.tmp`` (fsynced) and a rename: readers
    never see half a file. Temporary siblings left by dead writers of ``path`` are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if owner_gone(old.name[len(path.name) + 2 : -4]):
            old.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.{owner_tag()}.tmp"
    try:
        with open(tmp, "x") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
