"""The records: what is on this machine, the GGUF files malt has verified.

`$MALT_HOME/pulled.json` holds one entry per Hub file (keyed ``OWNER/REPO/FILE``) that
`malt pull` downloaded or registered with ``--file``: its path, size and the sha256 malt computed
itself, and what that sha256 was checked against. `malt run` trusts a file only through a record,
so a half-written or corrupt download (which never gets a record) can never be used.

The records file is small JSON, rewritten whole (`paths.write_json_atomic`) under a lock, so a
crash leaves the old or the new version, never half of one, and two concurrent pulls do not lose
each other's record.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from malt_local.errors import MaltError
from malt_local.models.filelock import exclusive_lock
from malt_local.paths import malt_home, write_json_atomic

RECORDS_FILE = "pulled.json"
RECORDS_VERSION = 1


# What a record's sha256 was checked against.
VERIFIED_MODELS_TOML = "models.toml"  # the sha256 pinned in the catalog
VERIFIED_ETAG = "hub-etag"  # the Hub's ETag, which is the sha256 of an LFS file
VERIFIED_TRUSTED = "trusted"  # mismatched the catalog, registered anyway with --trust
VERIFIED_NONE = "none"  # nothing to check against (no pin, no sha256 ETag)


def record_key(repo: str, file: str) -> str:
    """A record's key in pulled.json: ``OWNER/REPO/FILE``."""
    return f"{repo}/{file}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Record:
    """A GGUF file malt has hashed: where it is and what its sha256 was checked against."""

    repo: str
    file: str
    path: str  # absolute; for Hub downloads the snapshots/<commit>/<file> link
    sha256: str
    size: int
    verified_against: str  # models.toml | hub-etag | trusted | none
    source: str  # "hub" (downloaded) or "file" (registered with --file)
    alias: str | None = None
    quant: str | None = None
    revision: str | None = None
    commit: str | None = None
    mtime_ns: int | None = None  # of the file when it was hashed: unchanged = no re-hash
    recorded_at: str = field(default_factory=_now)

    @property
    def key(self) -> str:
        return record_key(self.repo, self.file)

    @property
    def verified(self) -> bool:
        return self.verified_against in (VERIFIED_MODELS_TOML, VERIFIED_ETAG)

    def problem(self, *, check_mtime: bool = False) -> str | None:
        """Why this record's file can no longer be trusted as is, or None when it can."""
        path = Path(self.path)
        try:
            st = path.stat()
        except OSError:
            return f"its file {path} is gone"
        if st.st_size != self.size:
            return f"its file {path} changed size ({st.st_size} bytes, {self.size} recorded)"
        if check_mtime and self.mtime_ns is not None and st.st_mtime_ns != self.mtime_ns:
            return f"its file {path} was modified after it was verified"
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def records_path(home: Path | None = None) -> Path:
    return (home or malt_home()) / RECORDS_FILE


def load_records(home: Path | None = None) -> dict[str, Record]:
    path = records_path(home)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise MaltError(
            f"cannot read the model records {path} ({exc}); move it away and pull again"
        ) from None
    return _parse_records(raw, path)


# The fields every record has, and the type of each; the others are optional (str or None,
# `mtime_ns` an int or None).
_REQUIRED = {"repo": str, "file": str, "path": str, "sha256": str, "size": int,
             "verified_against": str, "source": str}  # fmt: skip
_OPTIONAL = {"alias": str, "quant": str, "revision": str, "commit": str, "mtime_ns": int,
             "recorded_at": str}  # fmt: skip


def _is(value: object, kind: type) -> bool:
    # bool is an int to Python, and a size of `true` is no size.
    return isinstance(value, kind) and not isinstance(value, bool)


def _parse_records(raw: object, path: Path) -> dict[str, Record]:
    """The records of a parsed pulled.json, every field checked: a file of another shape
    (edited by hand, written by another tool) is one line naming it, not a traceback deep in
    `malt models` or `malt run`, and is never rewritten over by the next pull."""

    def bad(what: str) -> MaltError:
        return MaltError(
            f"the model records {path} are not malt's ({what}); move the file away and pull again"
        )

    if not isinstance(raw, dict):
        raise bad(f"a JSON {type(raw).__name__}, not an object")
    items = raw.get("records", {})
    if not isinstance(items, dict):
        raise bad('"records" is not an object')
    out: dict[str, Record] = {}
    for key, value in items.items():
        if not isinstance(value, dict):
            raise bad(f"the record {key!r:.80} is not an object")
        for name, kind in _REQUIRED.items():
            if not _is(value.get(name), kind):
                raise bad(f"the record {key!r:.80} has no {name} ({kind.__name__})")
        for name, kind in _OPTIONAL.items():
            if value.get(name) is not None and not _is(value[name], kind):
                raise bad(f"the record {key!r:.80} has a {name} that is not a {kind.__name__}")
        out[key] = Record.from_dict(value)
    return out


def save_record(record: Record, home: Path | None = None) -> None:
    """Add or replace the record for `record.key`, atomically."""
    path = records_path(home)
    # Serialise read-modify-write of the records file between concurrent `malt pull`s.
    with exclusive_lock(path.with_name(path.name + ".lock")):
        records = load_records(home)
        records[record.key] = record
        write_json_atomic(
            path,
            {
                "version": RECORDS_VERSION,
                "records": {k: dataclasses.asdict(r) for k, r in sorted(records.items())},
            },
        )


def find_record(repo: str, file: str, home: Path | None = None) -> Record | None:
    return load_records(home).get(record_key(repo, file))
