"""A full disk, reported as one line that names the file and the free space.

SQLite answers a write that finds no room with SQLITE_FULL ("database or disk is full") and
rolls the statement's transaction back, so the database stays as it was after the last commit;
a plain file write fails with ENOSPC (or EDQUOT, a quota). Commands wrap their writing part in
`disk_guard(path)`, which turns either into `DiskFullError` (exit code 75): the user frees space
and runs the same command, which continues from what was committed.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from malt_local.errors import DiskFullError

SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        if code is not None:
            return code & 0xFF == SQLITE_FULL
        return "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_space(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing folder)."""
    for folder in (path, *path.parents):
        if folder.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free
            return None
    return None


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns


def disk_full_error(exc: BaseException, path: Path) -> DiskFullError:
    """The one line for a full disk while writing `path` (an OSError's own file wins)."""
    name = getattr(exc, "filename", None)
    target = Path(name) if isinstance(name, str) else path
    return DiskFullError(
        f"disk full writing {target} ({human(free_space(target.parent))} free); everything "
        "written before is kept: free some space and run the same command again to continue"
    )


@contextlib.contextmanager
def disk_guard(path: Path) -> Iterator[None]:
    """Turn a full disk while writing `path` into `DiskFullError`; other errors pass."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, Path(path)) from None
        raise
