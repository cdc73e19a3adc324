"""Where malt keeps things, resolved in one place.

`MALT_HOME` moves every per-user file (model records, user aliases); tests point it at a
temporary folder. Project data (`malt.db`) lives in the working directory unless `--db` says
otherwise, the way `llm` keeps one file a user can find with `malt db path`.

The small JSON files malt keeps there (`pulled.json`, `hashes.json`) are rewritten whole through
a temporary file and `os.replace` (`write_json_atomic`), so a crash leaves the old or the new
version, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_DB = "malt.db"


def malt_home() -> Path:
    """The per-user folder: `$MALT_HOME`, else `$XDG_CONFIG_HOME/malt` or `~/.config/malt`."""
    env = os.environ.get("MALT_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "malt"


def default_db_path() -> Path:
    return Path(os.environ.get("MALT_DB", DEFAULT_DB))


def data_path(name: str) -> Path:
    """A file or folder shipped with malt (`prompts`, `models.toml`).

    An installed wheel has them under `malt_local/_data/`; an editable install or a checkout
    finds them at the repository root, one level above the package.
    """
    packaged = resources.files("malt_local") / "_data" / name
    if packaged.is_file() or packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / name


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as `path` whole: a temporary file beside it, fsynced, then `os.replace`."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` as `path` whole: a temporary file beside it, fsynced, then `os.replace`, so
    an interrupted write leaves the old file or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
