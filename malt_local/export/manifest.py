"""`manifest.json`: what an export holds and where it came from, so a dataset can be traced
and checked without the database.

- **Manifest** (`manifest.json`): counts, what was left out per role and why (`left_out`), θ,
  pairing and split rules, the source runs and their
  config, model sha256, prompt hashes, tool version, the licence notice the base model needs,
  and each file's line count and sha256. `malt train` reads it (malt_local.training.data).
- The seed's JSON files carry a metadata header built here too (`json_metadata`).

Nothing depends on the clock or on dict order, so exporting the same data again gives
byte-identical files, manifest included: its timestamp is the latest `created_at` in the
exported data (`Stats.latest`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from malt_local import __version__
from malt_local.export.options import ExportOptions
from malt_local.export.pairing import PAIRING_RULE, SPLIT_RULE, Dropped, Splitter
from malt_local.export.trees import RunInfo
from malt_local.hashing import sha256_file
from malt_local.models.catalog import licence_for_model_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TRAINING_NOTE = {
    "generator": "SFT only: the paper builds D_G but trains the generator with SFT (its DPO "
    "file is exported for experiments)",
    "verifier": "SFT, then DPO with the SFT adapter as reference (beta 0.2 in the paper)",
    "refiner": "SFT, then DPO with the SFT adapter as reference (beta 0.2 in the paper)",
}


@dataclass
class Stats:
    """What the walk over the trees found, as the manifest reports it."""

    complete: int = 0
    incomplete: int = 0
    latest: str = ""


def source_models(runs: list[RunInfo]) -> list[dict]:
    """The models the runs were generated with, each once, with the licence notice it needs."""
    seen: dict[tuple[str, str | None], dict] = {}
    for run in runs:
        key = (Path(run.model).name, run.model_sha256)
        if key not in seen:
            alias, notice = licence_for_model_file(run.model, run.model_sha256)
            seen[key] = {
                "file": key[0],
                "sha256": run.model_sha256,
                "alias": alias,
                "licence_notice": notice,
            }
    return list(seen.values())


def json_metadata(
    role: str,
    runs: list[RunInfo],
    models: list[dict],
    stats: Stats,
    options: ExportOptions,
    judged_runs: set[str],
) -> dict:
    """The seed's metadata (timestamp, model, total_examples), then malt's own fields."""
    return {
        "timestamp": stats.latest,
        "model": ", ".join(m["file"] for m in models),
        "total_examples": None,  # known once the examples are written
        "role": role,
        "theta": _theta(runs),
        "positives": "refiner: reward 1" if role == "refiner" else "value > theta",
        "evaluation": (
            "LLM judge where judged (malt run --judge), else the deterministic grader"
            if judged_runs
            else "deterministic grader (no LLM judge in these runs)"
        ),
        "source_runs": [r.id for r in runs],
        "tool": f"malt {__version__}",
    }


def _theta(runs: list[RunInfo]) -> float | None:
    """The θ the export labelled with; None when the runs differ (each source names its own)."""
    thetas = {r.theta for r in runs}
    return thetas.pop() if len(thetas) == 1 else None


def build_manifest(
    runs: list[RunInfo],
    options: ExportOptions,
    splitter: Splitter | None,
    stats: Stats,
    per_run: dict[str, dict[str, int]],
    models: list[dict],
    counts: dict[str, dict[str, int]],
    dropped: dict[str, Dropped],
    names: dict[str, dict[str, str]],
    tmp: Path,
) -> dict:
    files = {}
    for role in options.roles:
        for name in names[role].values():
            path = tmp / name
            with path.open("rb") as fh:
                lines = sum(1 for _ in fh)
            files[name] = {"lines": lines, "sha256": sha256_file(path)}
    notices = sorted({m["licence_notice"] for m in models if m["licence_notice"]})
    return {
        "tool": "malt",
        "tool_version": __version__,
        "manifest_version": MANIFEST_VERSION,
        "timestamp": stats.latest,
        "theta": _theta(runs),
        "theta_source": "--theta" if options.theta is not None else "each run's theta",
        "roles": list(options.roles),
        "formats": list(options.formats),
        "counts": counts,
        # Not in the files, so that a smaller count than the tree holds can be explained.
        "left_out": {role: dropped[role].as_dict() for role in options.roles},
        "keep_length_stopped": options.keep_length_stopped,
        "questions": {"exported": stats.complete, "incomplete_skipped": stats.incomplete},
        "positives": {
            "generator": "value > theta",
            "verifier": "value > theta",
            "refiner": "reward == 1",
        },
        "pairing": {"rule": PAIRING_RULE, "max_pairs_per_group": options.max_pairs_per_group},
        "split": (
            {
                "valid_fraction": options.valid_fraction,
                "rule": SPLIT_RULE,
                "moved_to_valid": dict(sorted(splitter.force_valid.items())),
                "moved_to_train": dict(sorted(splitter.force_train.items())),
            }
            if splitter
            else None
        ),
        "training": {role: TRAINING_NOTE[role] for role in options.roles},
        "licence_notices": notices,
        "models": models,
        "sources": [
            {
                "run_id": r.id,
                "created_at": r.row["created_at"],
                "theta": r.theta,
                "run_theta": r.row["theta"],
                "n": r.n,
                "task": r.task,
                "model": Path(r.model).name,
                "model_sha256": r.model_sha256,
                "prompts_sha256": r.row["prompts_sha256"],
                "prompt_hashes": json.loads(r.row["prompt_hashes"]),
                "tool_version": r.row["tool_version"],
                "questions_exported": per_run[r.id]["complete"],
                "questions_incomplete": per_run[r.id]["incomplete"],
                "config": json.loads(r.row["config"]),
                # The LoRA adapters each role's nodes were made with ({}: the base model).
                "adapters": run_adapters(json.loads(r.row["config"])),
            }
            for r in runs
        ],
        "files": files,
    }


def run_adapters(config: dict) -> dict[str, list[dict]]:
    """A run's per-role adapters from its stored config, as {role: [{path, sha256, scale}]}."""
    stacks = config.get("adapters") or {}
    files = config.get("adapter_files") or {}
    out: dict[str, list[dict]] = {}
    for role, stack in stacks.items():
        paths = files.get(role) or []
        out[role] = [
            {"path": paths[i] if i < len(paths) else None, "sha256": sha, "scale": scale}
            for i, (sha, scale) in enumerate(stack)
        ]
    return out
