"""An exclusive lock between processes, held on a lock file with `fcntl.flock`.

`malt pull` takes two: one around its read-modify-write of `pulled.json`, waiting for another
pull to finish its write, and one per blob it downloads, not waiting (two processes appending to
one ``.incomplete`` file would corrupt it). Where fcntl does not exist (Windows) there is no lock:
the last writer wins.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from malt_local.errors import MaltError


class LockHeld(Exception):
    """Another process holds the lock and the caller asked not to wait."""


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created, with its folder, if missing).

    With `wait=False` a lock another process holds raises `LockHeld` at once, before the body
    runs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: last writer wins
        yield
        return
    if path.is_symlink():  # a planted link: opening it would create or lock its target
        raise MaltError(f"{path} is a symbolic link malt did not make: remove it and try again")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
                raise LockHeld(str(path)) from None
            raise
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
