"""The catalog: what a model name means, read from models.toml.

The shipped `models.toml` (Hub repository, file per quantisation, sha256 and size where known,
chat template family, licence) with the user's `$MALT_HOME/models.toml` merged over it, so users
add or fix aliases without editing the package. An alias's licence lives here too: which notice
(e.g. "Built with Llama") a model asks to be shown, looked up by alias or by a run's model file.

What is on this machine is another source of truth, kept apart on purpose: the records
(`records.py`).
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malt_local.errors import MaltError
from malt_local.hashing import is_sha256
from malt_local.models.records import load_records
from malt_local.paths import data_path, malt_home

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

USER_MODELS_FILE = "models.toml"
DEFAULT_REVISION = "main"


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


def find_alias(name: str, catalog: dict[str, ModelEntry]) -> ModelEntry | None:
    """The entry `name` names: the alias itself, else the alias that matches ignoring case."""
    if name in catalog:
        return catalog[name]
    for alias, entry in catalog.items():
        if alias.lower() == name.lower():
            return entry
    return None


def licence_notice_for(alias: str | None, home: Path | None = None) -> str | None:
    """The notice a model's licence asks to be shown (e.g. "Built with Llama ..."), if any."""
    if not alias:
        return None
    entry = find_alias(alias.partition(":")[0], load_catalog(home))
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
