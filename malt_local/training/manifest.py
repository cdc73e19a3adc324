"""`adapters/manifest.json`: what `malt train` wrote, and how `malt eval --adapters` reads it.

The manifest records, per role and stage, the PEFT folder and the GGUF LoRA file with its
sha256, steps, loss per logged step and time; and once for the folder the base model and its
sha256, the export's manifest sha256 and data file hashes, every hyperparameter, the device and
the library versions. `apply` says which GGUF files each role uses at test time, in order: the
SFT adapter, then the DPO adapter trained on top of it (LoRA deltas add, so stacking the two on
the base gives the model DPO trained).

This module imports nothing from the training extra: `malt eval` reads manifests without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.roles import ROLES
from malt_local.training.settings import STAGES

MANIFEST = "manifest.json"
TOOL = "malt-train"
MANIFEST_VERSION = 1


def read_manifest(folder: Path) -> dict | None:
    """The manifest of an adapters folder, or None when the folder has none of malt train's."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest whole (temporary file, then rename)."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def apply_order(adapters: dict) -> dict[str, list[str]]:
    """Per role, the GGUF files to stack at test time: SFT first, then DPO."""
    out: dict[str, list[str]] = {}
    for role in ROLES:
        files = [
            adapters[f"{role}-{stage}"]["gguf"] for stage in STAGES if f"{role}-{stage}" in adapters
        ]
        if files:
            out[role] = files
    return out


def adapter_values(folder: Path) -> list[str]:
    """`malt eval --adapters DIR` as the equivalent `--adapter ROLE=PATH` values."""
    if not folder.is_dir():
        raise MaltError(f"--adapters {folder}: not a folder")
    manifest = read_manifest(folder)
    if manifest is None:
        raise MaltError(f"--adapters {folder}: no {MANIFEST} written by malt train")
    values = []
    for role, files in apply_order(manifest.get("adapters") or {}).items():
        for name in files:
            path = folder / name
            if not path.is_file():
                raise MaltError(f"--adapters {folder}: {name} is missing")
            values.append(f"{role}={path}")
    if not values:
        raise MaltError(f"--adapters {folder}: the manifest lists no adapters")
    return values
