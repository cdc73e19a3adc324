"""Where malt keeps things, resolved in one place.

`MALT_HOME` moves every per-user file (model records, user aliases); tests point it at a
temporary folder. Project data (`malt.db`) lives in the working directory unless `--db` says
otherwise, the way `llm` keeps one file a user can find with `malt db path`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

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
