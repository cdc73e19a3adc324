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


def trained_for(manifest: dict) -> tuple[str | None, list[str]]:
    """(the sha256 of the GGUF the adapters fit, the prompt digests their data was made with).

    A GGUF base is the model itself; a Hugging Face base is the same weights as the GGUF the
    export was generated with, so that one's digest stands for it. Either is None / empty where
    the manifest does not say (one written by an older malt).
    """
    base = manifest.get("base") if isinstance(manifest.get("base"), dict) else {}
    export = manifest.get("export") if isinstance(manifest.get("export"), dict) else {}
    model = export.get("model") if isinstance(export.get("model"), dict) else {}
    sha = base.get("sha256") if base.get("kind") == "gguf" else model.get("sha256")
    prompts = export.get("prompts_sha256")
    prompts = [p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else []
    return (sha if isinstance(sha, str) else None), prompts


def identity_problem(
    folder: Path, manifest: dict, model_sha256: str, prompts_sha256: str
) -> str | None:
    """Why the adapters in `folder` were not made for this model and these prompts, or None.

    Adapters trained on other weights load whenever the shapes agree (any fine-tune of the same
    base does), and roles trained under other prompts meet turns they never saw; either gives
    figures that look like MALT's and are not. Only what the manifest records is compared.
    """
    sha, prompts = trained_for(manifest)
    if sha is not None and sha != model_sha256:
        return (
            f"--adapters {folder} were trained on the model with sha256 {sha[:12]}…, not on "
            f"--model (sha256 {model_sha256[:12]}…): pass that model, or --allow-mismatch"
        )
    if prompts and prompts_sha256 not in prompts:
        return (
            f"--adapters {folder} were trained on trees made with other prompts (sha256 "
            f"{', '.join(p[:12] + '…' for p in prompts)}; these are {prompts_sha256[:12]}…): "
            "pass the run's --prompts folder, or --allow-mismatch"
        )
    return None


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
