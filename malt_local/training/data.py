"""What `malt train` reads from a `malt export` folder, checked before any model loads.

The export's manifest names the model the data was generated with (file and sha256) and every
data file with its sha256, so a file edited or swapped after the export is caught here, and the
adapters' manifest can record exactly which data trained them.

SFT lines are TRL "messages" rows; they are turned into conversational prompt/completion rows
(the prompt is every message but the last, the completion the role's own turn), for which TRL
puts the loss on the completion only: the role learns its own turn, not the question or the
other roles' turns it reads. SmolLM2's chat template has no `{% generation %}` markers, so TRL's
`assistant_only_loss` cannot be used instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.export.manifest import MANIFEST
from malt_local.hashing import sha256_file as _sha256


@dataclass(frozen=True)
class DataModel:
    """The GGUF the exported runs were generated with, as the export's manifest names it."""

    file: str
    sha256: str | None
    alias: str | None


@dataclass
class ExportData:
    """An export folder: its manifest, and per role the SFT rows and DPO pairs."""

    folder: Path
    manifest: dict
    manifest_sha256: str
    models: list[DataModel]
    sft: dict[str, list[dict]] = field(default_factory=dict)
    dpo: dict[str, list[dict]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256, the files read
    # Roles left out because they have nothing to train on (role -> why); only with skip_empty.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> DataModel | None:
        """The one model of the data (None when the export mixes runs of several models)."""
        return self.models[0] if len(self.models) == 1 else None


def _read_manifest(folder: Path) -> dict:
    if not folder.exists():
        raise MaltError(f"export folder not found: {folder}")
    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise MaltError(f"{folder} is not a malt export (no {MANIFEST}; make one with malt export)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MaltError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("tool") != "malt":
        raise MaltError(f"{folder} is not a malt export ({MANIFEST} was not written by malt)")
    if not isinstance(manifest.get("files"), dict):
        raise MaltError(f"{path} lists no files: not a malt export manifest")
    return manifest


def _rows(path: Path, kind: str) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise MaltError(f"{path}:{number}: not JSON ({exc.args[0]})") from exc
            rows.append(_check_row(row, kind, f"{path}:{number}"))
    return rows


def _is_chat(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


def _check_row(row: object, kind: str, where: str) -> dict:
    if kind == "sft":
        messages = row.get("messages") if isinstance(row, dict) else None
        if not _is_chat(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise MaltError(f"{where}: an SFT line needs messages ending in an assistant turn")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    if not isinstance(row, dict) or not all(
        _is_chat(row.get(k)) for k in ("prompt", "chosen", "rejected")
    ):
        raise MaltError(f"{where}: a DPO line needs prompt, chosen and rejected messages")
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def load_export(
    folder: Path, roles: list[str], stages: list[str], *, skip_empty: bool = False
) -> ExportData:
    """Read and check the files `roles` x `stages` need; DPO files are read for SFT+DPO.

    A role with no SFT lines has nothing to train (DPO starts from the role's SFT model): an
    error when the user named that role, but with `skip_empty` (`--role all`) it goes to
    `skipped`, so that one role without positives does not stop the others; an error again
    when every role is empty."""
    manifest = _read_manifest(folder)
    exported = manifest.get("roles") or []
    models = [
        DataModel(str(m.get("file")), m.get("sha256"), m.get("alias"))
        for m in manifest.get("models") or []
        if isinstance(m, dict)
    ]
    data = ExportData(folder, manifest, _sha256(folder / MANIFEST), models)
    for role in roles:
        if role not in exported:
            raise MaltError(f"{folder} has no {role} data (exported roles: {', '.join(exported)})")
        for stage in ("sft", "dpo"):
            if stage == "dpo" and "dpo" not in stages:
                continue
            name = f"{role}.{stage}.jsonl"
            entry = manifest["files"].get(name)
            path = folder / name
            if entry is None or not path.is_file():
                raise MaltError(f"{folder} has no {name} (export it with malt export --format all)")
            digest = _sha256(path)
            if isinstance(entry, dict) and entry.get("sha256") not in (None, digest):
                raise MaltError(
                    f"{path} changed after the export (its sha256 is not the manifest's)"
                )
            data.files[name] = digest
            (data.sft if stage == "sft" else data.dpo)[role] = _rows(path, stage)
        if not data.sft[role]:
            if not skip_empty:
                raise MaltError(
                    f"{role}.sft.jsonl in {folder} has no lines (no {role} positives): nothing "
                    "to train for that role"
                )
            why = f"{role}.sft.jsonl has no lines (no {role} positives)"
            pairs = len(data.dpo.get(role) or [])
            if pairs:
                why += f"; its {pairs} DPO pair(s) need an SFT model to start from"
            data.skipped[role] = why
    if roles and len(data.skipped) == len(roles):
        raise MaltError(
            f"{folder}: no role has SFT lines (no positives in {', '.join(roles)}): nothing to "
            "train"
        )
    return data
