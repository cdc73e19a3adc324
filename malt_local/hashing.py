"""sha256 of model files, remembered by path, size and mtime.

A run records the sha256 of its model so a resumed run can tell the file was swapped; hashing a
5 GB GGUF takes a while, so the digest is cached in `MALT_HOME/hashes.json` and recomputed only
when the file's size or modification time change.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from malt_local.paths import malt_home

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a cache we cannot write only costs time
    return digest
