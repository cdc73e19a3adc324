"""Opening a database for reading only, wherever it lies, and reading any text it holds.

`Store.read_only` opens with SQLite's `mode=ro`. A WAL database still needs its `-shm` file
to read, and SQLite creates it when it is missing; on read-only media (a CD, a read-only
mount, a folder without write permission) it cannot, and the open fails with "unable to open
database file". Then the file is opened `immutable=1`: SQLite reads the main file as it is,
with no locks and no `-shm`. That is right for a copy nobody writes (which is the only kind
read-only media can hold); a `-wal` file beside it, which such a copy should not have, would
be ignored, so the immutable open is only the fallback.

Text that is not valid UTF-8 decodes with U+FFFD, as on every Store connection
(`malt_local.db.store.decode_text`), the immutable one included.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database

from malt_local.db.store import Store, decode_text
from malt_local.errors import MaltError


def open_read_only(path: str | Path) -> Store:
    """`Store.read_only`, falling back to an `immutable=1` open when `mode=ro` cannot open
    the file (a WAL database on read-only media, without its `-shm`); text decodes
    tolerantly either way."""
    p = Path(path)
    try:
        store = Store.read_only(p)
    except MaltError as exc:
        cause = exc.__cause__
        if not (
            isinstance(cause, sqlite3.OperationalError)
            and getattr(cause, "sqlite_errorname", "") == "SQLITE_CANTOPEN"
        ):
            raise
        store = _immutable(p, exc)
    return store


def _immutable(p: Path, first: MaltError) -> Store:
    try:
        conn = sqlite3.connect(
            p.resolve().as_uri() + "?mode=ro&immutable=1",
            uri=True,
            timeout=30,
            check_same_thread=False,
        )
        conn.text_factory = decode_text
        db = Database(conn)
        tables = set(db.table_names())
    except sqlite3.DatabaseError:
        raise first from None
    if not {"runs", "questions", "nodes"} <= tables:
        conn.close()
        raise MaltError(f"{p} is not a malt database (no runs/questions/nodes tables)")
    store = Store.__new__(Store)  # what Store.read_only builds, over the immutable connection
    store.path = p
    store.db = db
    return store
