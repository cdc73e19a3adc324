"""Model aliases and the records of the GGUF files malt has verified.

Two sources of truth, kept apart on purpose:

* the *catalog*: what a name means. The shipped `models.toml` (Hub repository, file per
  quantisation, sha256 and size where known, chat template family, licence) with the user's
  `$MALT_HOME/models.toml` merged over it, so users add or fix aliases without editing the
  package;
* the *records*: what is on this machine. `$MALT_HOME/pulled.json` holds one entry per Hub file
  (keyed ``OWNER/REPO/FILE``) that `malt pull` downloaded or registered with ``--file``: its path,
  size and the sha256 malt computed itself, and what that sha256 was checked against. `malt run`
  trusts a file only through a record, so a half-written or corrupt download (which never gets a
  record) can never be used.

The records file is small JSON, rewritten whole through a temporary file and `os.replace`, so a
crash leaves the old or the new version, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from malt_local.errors import MaltError
from malt_local.hashing import is_sha256
from malt_local.paths import data_path, malt_home

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

USER_MODELS_FILE = "models.toml"
RECORDS_FILE = "pulled.json"
RECORDS_VERSION = 1
DEFAULT_REVISION = "main"


# What a record's sha256 was checked against.
VERIFIED_MODELS_TOML = "models.toml"  # the sha256 pinned in the catalog
VERIFIED_ETAG = "hub-etag"  # the Hub's ETag, which is the sha256 of an LFS file
VERIFIED_TRUSTED = "trusted"  # mismatched the catalog, registered anyway with --trust
VERIFIED_NONE = "none"  # nothing to check against (no pin, no sha256 ETag)


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class QuantFile:
    """One quantisation of an alias: a file in the alias's Hub repository."""

    quant: str
    file: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One alias of the catalog."""

    alias: str
    repo: str
    default_quant: str
    files: dict[str, QuantFile]
    revision: str = DEFAULT_REVISION
    chat_template: str | None = None
    context_length: int | None = None
    licence: str | None = None
    licence_notice: str | None = None

    def quant_file(self, quant: str | None) -> QuantFile:
        """The file for `quant` (case-insensitive), the default quantisation when None."""
        wanted = quant or self.default_quant
        for name, qf in self.files.items():
            if name.lower() == wanted.lower():
                return qf
        known = ", ".join(self.files)
        raise MaltError(
            f"unknown quantisation '{wanted}' for model '{self.alias}' (known: {known})"
        )


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise MaltError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise MaltError(f"cannot read {path}: {exc.strerror or exc}") from None


def _merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """User tables win field by field; `files` merge quantisation by quantisation."""
    merged = dict(base)
    for key, value in over.items():
        if key == "files" and isinstance(value, dict) and isinstance(base.get("files"), dict):
            files = {q: dict(v) for q, v in base["files"].items()}
            for quant, table in value.items():
                files[quant] = {**files.get(quant, {}), **table}
            merged["files"] = files
        else:
            merged[key] = value
    return merged


def _entry_from_table(alias: str, table: dict[str, Any], sources: str) -> ModelEntry:
    def bad(msg: str) -> MaltError:
        return MaltError(f"{sources}: model '{alias}': {msg}")

    repo = table.get("repo")
    if not isinstance(repo, str) or repo.count("/") != 1:
        raise bad("'repo' must be 'OWNER/NAME'")
    raw_files = table.get("files")
    if not isinstance(raw_files, dict) or not raw_files:
        raise bad("needs at least one [files.QUANT] table")
    files: dict[str, QuantFile] = {}
    for quant, spec in raw_files.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            raise bad(f"quantisation '{quant}' needs file = \"NAME.gguf\"")
        sha = (spec.get("sha256") or "").strip().lower() or None
        if sha is not None and not is_sha256(sha):
            raise bad(f"quantisation '{quant}': sha256 must be 64 hex digits or \"\"")
        size = spec.get("size")
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise bad(f"quantisation '{quant}': size must be a positive integer")
        files[quant] = QuantFile(quant=quant, file=spec["file"], size=size, sha256=sha)
    default_quant = table.get("default_quant") or next(iter(files))
    if default_quant not in files:
        raise bad(f"default_quant '{default_quant}' has no [files.{default_quant}] table")
    context_length = table.get("context_length")
    return ModelEntry(
        alias=alias,
        repo=repo,
        default_quant=default_quant,
        files=files,
        revision=str(table.get("revision") or DEFAULT_REVISION),
        chat_template=table.get("chat_template"),
        context_length=int(context_length) if context_length else None,
        licence=table.get("licence"),
        licence_notice=table.get("licence_notice") or None,
    )


def catalog_files(home: Path | None = None) -> list[Path]:
    """The catalog files in merge order: shipped first, then the user's (if present)."""
    files = [data_path("models.toml")]
    user = (home or malt_home()) / USER_MODELS_FILE
    if user.is_file():
        files.append(user)
    return files


def load_catalog(home: Path | None = None) -> dict[str, ModelEntry]:
    """All aliases: the shipped models.toml with the user's models.toml merged over it."""
    tables: dict[str, dict[str, Any]] = {}
    origin: dict[str, list[str]] = {}
    for path in catalog_files(home):
        if not path.is_file():
            continue
        models = _load_toml(path).get("models", {})
        if not isinstance(models, dict):
            raise MaltError(f"{path}: [models] must be a table of aliases")
        for alias, table in models.items():
            if not isinstance(table, dict):
                raise MaltError(f"{path}: models.{alias} must be a table")
            tables[alias] = _merge_tables(tables.get(alias, {}), table)
            origin.setdefault(alias, []).append(str(path))
    return {
        alias: _entry_from_table(alias, table, " + ".join(origin[alias]))
        for alias, table in tables.items()
    }


def suggest(name: str, choices: list[str]) -> str:
    """' (did you mean ...?)' for the closest names, or '' when nothing is close."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{lowered[c]}'" for c in close) + "?)"


def _find_alias(name: str, catalog: dict[str, ModelEntry]) -> ModelEntry | None:
    if name in catalog:
        return catalog[name]
    for alias, entry in catalog.items():
        if alias.lower() == name.lower():
            return entry
    return None


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """What a `malt pull` argument names: one file in one Hub repository."""

    repo: str
    file: str
    revision: str
    alias: str | None = None
    quant: str | None = None
    sha256: str | None = None  # pinned in the catalog
    size: int | None = None  # from the catalog, informational
    entry: ModelEntry | None = None

    @property
    def key(self) -> str:
        return record_key(self.repo, self.file)

    @property
    def display(self) -> str:
        """How to name this model back to the user (what they would type)."""
        if self.alias:
            return f"{self.alias}:{self.quant}" if self.quant else self.alias
        return f"{self.repo}/{self.file}"


_HUB_URL_RE = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/", re.IGNORECASE)


def _looks_like_hub_path(spec: str) -> bool:
    return spec.count("/") >= 2 and spec.lower().endswith(".gguf")


def parse_spec(
    spec: str,
    catalog: dict[str, ModelEntry] | None = None,
    revision: str | None = None,
) -> ModelSpec:
    """`ALIAS[:QUANT]`, `OWNER/REPO/FILE.gguf` or a Hub file URL, to a `ModelSpec`.

    A Hub path that matches a catalog entry picks up its pinned sha256, so pulling by path
    verifies as strictly as pulling by alias.
    """
    catalog = load_catalog() if catalog is None else catalog
    spec = spec.strip()
    if _HUB_URL_RE.match(spec) or _looks_like_hub_path(spec):
        path = _HUB_URL_RE.sub("", spec)
        parts = [p for p in path.split("/") if p]
        url_revision = None
        if len(parts) >= 5 and parts[2] in ("resolve", "blob"):
            url_revision, parts = parts[3], parts[:2] + parts[4:]
        if len(parts) < 3:
            raise MaltError(f"'{spec}' does not name a file: use OWNER/REPO/FILE.gguf")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        for entry in catalog.values():
            for qf in entry.files.values():
                if entry.repo == repo and qf.file == file:
                    return ModelSpec(
                        repo=repo,
                        file=file,
                        revision=revision or url_revision or entry.revision,
                        alias=entry.alias,
                        quant=qf.quant,
                        sha256=qf.sha256,
                        size=qf.size,
                        entry=entry,
                    )
        return ModelSpec(repo=repo, file=file, revision=revision or url_revision or "main")
    if spec.count("/") == 1 and ":" not in spec.split("/")[0]:
        raise MaltError(
            f"'{spec}' names a repository, not a file: use {spec}/FILE.gguf, or an alias "
            "from `malt models`"
        )
    name, _, quant = spec.partition(":")
    entry = _find_alias(name, catalog)
    if entry is None:
        raise MaltError(
            f"unknown model '{name}'{suggest(name, list(catalog))}; `malt models` lists them"
        )
    qf = entry.quant_file(quant or None)
    return ModelSpec(
        repo=entry.repo,
        file=qf.file,
        revision=revision or entry.revision,
        alias=entry.alias,
        quant=qf.quant,
        sha256=qf.sha256,
        size=qf.size,
        entry=entry,
    )


# --------------------------------------------------------------------------- records


def record_key(repo: str, file: str) -> str:
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


@contextlib.contextmanager
def _records_lock(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the records file between concurrent `malt pull`s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: last writer wins
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    items = raw.get("records", {}) if isinstance(raw, dict) else {}
    return {key: Record.from_dict(value) for key, value in items.items()}


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_record(record: Record, home: Path | None = None) -> None:
    """Add or replace the record for `record.key`, atomically."""
    path = records_path(home)
    with _records_lock(path):
        records = load_records(home)
        records[record.key] = record
        _write_json_atomic(
            path,
            {
                "version": RECORDS_VERSION,
                "records": {k: dataclasses.asdict(r) for k, r in sorted(records.items())},
            },
        )


def find_record(repo: str, file: str, home: Path | None = None) -> Record | None:
    return load_records(home).get(record_key(repo, file))


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class ResolvedModel:
    """A GGUF file `malt run` may load, with what is known about it."""

    path: Path
    sha256: str | None
    alias: str | None
    licence_notice: str | None
    quant: str | None = None
    repo: str | None = None
    chat_template: str | None = None
    context_length: int | None = None


def _resolved(record: Record, entry: ModelEntry | None) -> ResolvedModel:
    return ResolvedModel(
        path=Path(record.path),
        sha256=record.sha256,
        alias=entry.alias if entry else record.alias,
        licence_notice=entry.licence_notice if entry else None,
        quant=record.quant,
        repo=record.repo,
        chat_template=entry.chat_template if entry else None,
        context_length=entry.context_length if entry else None,
    )


def _not_pulled(display: str) -> MaltError:
    return MaltError(
        f"model '{display}' is not pulled: run `malt pull {display}` "
        f"(or `malt pull {display} --file PATH` on an air-gapped machine)"
    )


def resolve_model(spec: str, home: Path | None = None) -> ResolvedModel:
    """What `malt run --model SPEC` loads: a GGUF path, or an alias pulled before.

    Cheap on purpose (no hashing, no network): a file only resolves through a record written
    after its sha256 was checked, and a recorded file whose size changed since is refused.
    """
    catalog = load_catalog(home)
    records = load_records(home)
    path = Path(spec).expanduser()
    if path.is_file():
        absolute = path.resolve()
        for record in records.values():
            if Path(record.path).resolve() == absolute:
                entry = catalog.get(record.alias or "")
                return dataclasses.replace(_resolved(record, entry), path=path)
        return ResolvedModel(path=path, sha256=None, alias=None, licence_notice=None)
    if spec.lower().endswith(".gguf") or os.sep in spec or spec.startswith("."):
        record = None
        if _looks_like_hub_path(spec):
            parsed = parse_spec(spec, catalog)
            record = records.get(parsed.key)
            if record is not None and record.problem() is None:
                return _resolved(record, parsed.entry)
        raise MaltError(
            f"model file {spec} does not exist"
            + (
                f" (to fetch it from the Hub: `malt pull {spec}`)"
                if _looks_like_hub_path(spec)
                else ""
            )
        )
    parsed = parse_spec(spec, catalog)  # unknown alias or quantisation: MaltError
    entry = parsed.entry
    assert entry is not None
    quant_given = ":" in spec
    candidates = [entry.quant_file(parsed.quant)]
    if not quant_given:
        # No quantisation asked for: the default one, else any quantisation already pulled.
        candidates += [qf for q, qf in entry.files.items() if q != parsed.quant]
    broken: str | None = None
    pulled = []
    for qf in candidates:
        record = records.get(record_key(entry.repo, qf.file))
        if record is None:
            continue
        problem = record.problem()
        if problem is None:
            pulled.append(record)
        elif broken is None:
            broken = problem
    if pulled:
        best = (
            pulled[0]
            if quant_given
            else max(pulled, key=lambda r: (r.quant == entry.default_quant, r.recorded_at))
        )
        return _resolved(best, entry)
    if broken is not None:
        raise MaltError(
            f"model '{parsed.display}' cannot be used: {broken}; run `malt pull {parsed.display}`"
        )
    raise _not_pulled(spec if quant_given else entry.alias)


def licence_notice_for(alias: str | None, home: Path | None = None) -> str | None:
    """The notice a model's licence asks to be shown (e.g. "Built with Llama ..."), if any."""
    if not alias:
        return None
    entry = _find_alias(alias.partition(":")[0], load_catalog(home))
    return entry.licence_notice if entry else None


def licence_for_model_file(model_path: str, sha256: str | None) -> tuple[str | None, str | None]:
    """(alias, notice) for a run's model file, from models.toml: by the pulled record that
    names the file, else by a pinned sha256, else by the file name."""
    catalog = load_catalog()
    name = Path(model_path).name
    with contextlib.suppress(MaltError):
        for record in load_records().values():
            if (sha256 and record.sha256 == sha256) or record.path == model_path:
                entry = catalog.get(record.alias or "")
                if entry is not None:
                    return entry.alias, entry.licence_notice
    for match in (lambda qf: bool(sha256) and qf.sha256 == sha256, lambda qf: qf.file == name):
        for alias in sorted(catalog):
            entry = catalog[alias]
            if any(match(qf) for qf in entry.files.values()):
                return alias, entry.licence_notice
    return None, None


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ModelRow:
    """One line of `malt models`: an alias's quantisation, or a file pulled by Hub path."""

    alias: str | None
    quant: str | None
    default: bool
    repo: str
    file: str
    pulled: bool
    status: str  # yes | no | yes, unverified | yes, trusted | missing | changed
    size: int | None
    path: str | None
    sha256: str | None
    verified_against: str | None
    licence: str | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _status(record: Record | None) -> tuple[bool, str]:
    if record is None:
        return False, "no"
    problem = record.problem()
    if problem is not None:
        return False, "missing" if "gone" in problem else "changed"
    if record.verified_against == VERIFIED_TRUSTED:
        return True, "yes, trusted"
    if record.verified_against == VERIFIED_NONE:
        return True, "yes, unverified"
    return True, "yes"


def model_rows(home: Path | None = None) -> list[ModelRow]:
    """Every quantisation of every alias, then records that belong to no alias."""
    catalog = load_catalog(home)
    records = load_records(home)
    rows: list[ModelRow] = []
    seen: set[str] = set()
    for alias in sorted(catalog):
        entry = catalog[alias]
        for quant, qf in entry.files.items():
            key = record_key(entry.repo, qf.file)
            seen.add(key)
            record = records.get(key)
            pulled, status = _status(record)
            rows.append(
                ModelRow(
                    alias=alias,
                    quant=quant,
                    default=quant == entry.default_quant,
                    repo=entry.repo,
                    file=qf.file,
                    pulled=pulled,
                    status=status,
                    size=record.size if record else qf.size,
                    path=record.path if record else None,
                    sha256=record.sha256 if record else qf.sha256,
                    verified_against=record.verified_against if record else None,
                    licence=entry.licence,
                )
            )
    for key in sorted(set(records) - seen):
        record = records[key]
        pulled, status = _status(record)
        rows.append(
            ModelRow(
                alias=None,
                quant=None,
                default=False,
                repo=record.repo,
                file=record.file,
                pulled=pulled,
                status=status,
                size=record.size,
                path=record.path,
                sha256=record.sha256,
                verified_against=record.verified_against,
                licence=None,
            )
        )
    return rows
