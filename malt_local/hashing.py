"""sha256 of files (streamed, optionally reporting progress), of model files remembered by
path, size and mtime, and the check that a string is a sha256 hex digest.

A run records the sha256 of its model so a resumed run can tell the file was swapped; hashing a
5 GB GGUF takes a while, so the digest is cached in `MALT_HOME/hashes.json` and recomputed only
when the file's size or modification time change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from malt_local.paths import malt_home, write_json_atomic

CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(value: str | None) -> bool:
    """64 lower-case hex digits: what malt stores, pins and compares."""
    return bool(value) and bool(_SHA256_RE.match(value or ""))


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Stream a file through sha256 (about 1 GB/s: a few seconds for an 8B model); `on_bytes`
    hears each chunk's length, for a progress bar."""
    h = hashlib.sha256()
    hash_into(h, path, on_bytes)
    return h.hexdigest()


def hash_into(
    hasher: hashlib._Hash, path: Path, on_bytes: Callable[[int], None] | None = None
) -> int:
    """Feed a file's bytes to `hasher` chunk by chunk; returns how many there were. A resumed
    download hashes its partial file this way and goes on with the same hasher."""
    total = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            total += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return total


def cached_sha256(path: Path) -> str:
    path = path.resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = malt_home() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}:")}
    cache[key] = digest
    with contextlib.suppress(OSError):  # a cache we cannot write only costs time
        write_json_atomic(cache_file, cache)
    return digest
