"""Publishing a finished output directory: whole or not at all, never over an input, never over a rival.

A writer builds its output in a hidden sibling ``.{name}.soce-tmp-{owner}`` (``owner`` = host hash, pid,
process start time, random suffix), fsyncs every file and the directory, then publishes it under an
exclusive lock on the parent directory (``flock``):

* without overwrite: ``renameat2(RENAME_NOREPLACE)``: if anything appeared at the target since the start,
  the rename fails and the writer reports "output exists" (no check-then-act window);
* with overwrite: ``renameat2(RENAME_EXCHANGE)`` swaps old and new in one step, then the old is deleted;
  where the kernel or file system lacks renameat2, the old is renamed aside (``.{name}.soce-old-{owner}``),
  the new one in, then the old deleted: a kill in between is undone by :func:`recover` (old put back).

:func:`recover` runs at the start of every write into a directory: siblings of writers that are gone (same
host, pid not running or running a different process) are removed, and an old copy whose target is missing
is renamed back. Siblings of live writers and of other hosts are left alone.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from soce.files import owner_gone, owner_tag
from soce.soup.io import SoupError, who

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
USE_RENAMEAT2 = sys.platform.startswith("linux")  # off: the portable fallback (tests use it for that path)
_SIBLING = re.compile(r"^\.(?P<name>.+)\.soce-(?P<kind>tmp|old)-(?P<owner>[0-9a-z-]+)$")


@contextmanager
def dir_lock(directory: Path) -> Iterator[int]:
    """Exclusive ``flock`` on ``directory`` (all soce writers into it serialise their publication and
    recovery); yields the directory's fd (for fsync). Where locks are unsupported, runs unlocked."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # e.g. some network file systems: RENAME_NOREPLACE still keeps "no overwrite"
        yield fd
    finally:
        os.close(fd)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Rename with ``flags``; False where renameat2 (or the flag) is unsupported. OSError otherwise."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if USE_RENAMEAT2 else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename(src: Path, dst: Path) -> None:
    """Plain rename (one function, so that crash tests can stop between the two renames of the fallback)."""
    os.rename(src, dst)


def remove(path: Path) -> None:
    """Delete a file or a directory tree (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exists_error(out: Path) -> SoupError:
    return SoupError(f"{out}: output exists (another writer published it first, or pass overwrite=true)")


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished, fsynced ``tmp`` to ``out`` (a sibling) atomically: ``out`` shows the old content
    or the new one, whole, at every instant (the fallback path: see the module doc). Without ``overwrite``
    an existing ``out`` is never replaced, even one that appeared since the writer started: SoupError."""
    with dir_lock(out.parent) as dfd:
        if not (overwrite and os.path.lexists(out)):
            try:
                done = _renameat2(tmp, out, RENAME_NOREPLACE)
            except FileExistsError:
                raise _exists_error(out) from None
            if not done:
                if os.path.lexists(out):
                    raise _exists_error(out)
                rename(tmp, out)
        elif _renameat2(tmp, out, RENAME_EXCHANGE):
            os.fsync(dfd)
            remove(tmp)  # the old content, now under the temporary name
        else:
            old = out.parent / f".{out.name}.soce-old-{owner_tag()}"
            rename(out, old)
            try:
                rename(tmp, out)
            except BaseException:
                rename(old, out)
                raise
            os.fsync(dfd)
            remove(old)
        os.fsync(dfd)


def recover(directory: Path) -> list[str]:
    """Clean up after writers into ``directory`` that died: their temporary siblings are removed; an old
    copy set aside whose target is missing is put back. Returns what was done, one line per entry."""
    if not directory.is_dir():
        return []
    done = []
    with dir_lock(directory) as dfd:
        for entry in sorted(directory.iterdir()):
            m = _SIBLING.match(entry.name)
            if not m or not owner_gone(m["owner"]):
                continue
            target = directory / m["name"]
            if m["kind"] == "old" and not os.path.lexists(target):
                rename(entry, target)
                done.append(f"restored {target} from {entry.name}")
            else:
                remove(entry)
                done.append(f"removed {entry}")
        if done:
            os.fsync(dfd)
    return done


def fsync_tree(directory: Path) -> None:
    """fsync every file in ``directory`` (one level) and the directory itself."""
    for f in directory.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_path(output: str | Path, inputs: dict[str, Path]) -> Path:
    """The output dir, fully resolved (``..`` and symlinks); SoupError when it is, contains, or lies inside
    an input (compared both by resolved path and by device/inode of every existing ancestor)."""
    out = Path(output).expanduser().resolve()
    out_ids = _ancestor_ids(out)
    for name, p in inputs.items():
        rp = Path(p).expanduser().resolve()
        same = rp == out or (_id(out) is not None and _id(rp) == _id(out))
        over = rp.is_relative_to(out) or (_id(out) is not None and _id(out) in _ancestor_ids(rp))
        inside = rp.is_dir() and (out.is_relative_to(rp) or _id(rp) in out_ids)
        if same or over or inside:
            how = "is" if same else "lies inside" if inside else "contains"
            raise SoupError(
                f"{output}: output overlaps {who(name)}: it resolves to {out}, which {how}"
                f" {rp}; the output must be a new directory outside every input"
            )
    return out


def _id(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ancestor_ids(p: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``p`` and of each of its ancestors that exist."""
    return {i for i in map(_id, [p, *p.parents]) if i is not None}
