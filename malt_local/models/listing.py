"""What `malt models` lists: every quantisation of every alias, then the files pulled by Hub
path, each with whether it is pulled and what its sha256 was checked against."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malt_local.models.catalog import load_catalog
from malt_local.models.records import (
    VERIFIED_NONE,
    VERIFIED_TRUSTED,
    Record,
    load_records,
    record_key,
)


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
