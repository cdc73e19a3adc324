"""How `malt run --model SPEC` finds the GGUF it loads, from the catalog and the records alone.

`resolve_model` is what the engines call; `malt pull` is what makes a name resolvable.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.models.catalog import ModelEntry, load_catalog
from malt_local.models.records import Record, load_records, record_key
from malt_local.models.spec import looks_like_hub_path, parse_spec


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
        if looks_like_hub_path(spec):
            parsed = parse_spec(spec, catalog)
            record = records.get(parsed.key)
            if record is not None and record.problem() is None:
                return _resolved(record, parsed.entry)
        raise MaltError(
            f"model file {spec} does not exist"
            + (
                f" (to fetch it from the Hub: `malt pull {spec}`)"
                if looks_like_hub_path(spec)
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
