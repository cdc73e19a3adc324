"""A really small filesystem for the full-disk tests: a tmpfs mounted for one test.

Mounting needs root (CI runs the suite as root). Without it the tests fail and say why: a
full disk mocked in Python would not show what SQLite and the kernel really do.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.fail(f"the full-disk tests mount a {size} tmpfs and need root: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def leave_free(folder: Path, nbytes: int) -> Path:
    """Fill the filesystem of `folder` with one file until `nbytes` are free; returns it."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    assert free > nbytes, f"{folder} has only {free} bytes free"
    with filler.open("wb") as fh:
        fh.write(b"\0" * (free - nbytes))
    return filler
