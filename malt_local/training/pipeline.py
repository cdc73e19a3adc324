"""`malt train` from start to finish: check everything, train each stage, publish the adapters.

Order of work: the export folder, the settings, the output folder and the base model are all
checked before any weights load, so bad input costs nothing and writes nothing. Stages train in
`OUT.partial/` (checkpoints, then each finished stage's PEFT folder and GGUF file); a rerun of
the same command finds them there and goes on from the newest checkpoint. When every stage is
done the files move into OUT, each one whole, and the manifest is written last.

OUT belongs to one training identity: the export's manifest, the base model and the
hyperparameters (`fingerprint`). Another role or stage of the same identity is added to the same
OUT; anything else is refused unless `--force`, which discards that OUT (and a partial folder)
when the new adapters are in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from malt_local import __version__
from malt_local.errors import MaltError
from malt_local.roles import ROLES
from malt_local.training.base_model import Base, load_base, pick_device, resolve_base
from malt_local.training.data import ExportData, load_export
from malt_local.training.lengths import MAX_CUT_SHARE, StageLengths, check_share, measure
from malt_local.training.manifest import (
    MANIFEST_VERSION,
    TOOL,
    apply_order,
    read_manifest,
    write_manifest,
)
from malt_local.training.settings import TrainSettings, fingerprint

STATE = "state.json"
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "gguf")
# What the caller is told: (event, details); "stage" starts a stage, "step" is one step.
Events = Callable[[str, dict], None]


@dataclass(frozen=True)
class Stage:
    role: str
    stage: str  # "sft" or "dpo"

    @property
    def name(self) -> str:
        return f"{self.role}-{self.stage}"


@dataclass(frozen=True)
class Plan:
    stages: list[Stage]
    skipped: dict[str, str]  # stage name -> why it is not trained
    done: list[str]  # stages already in OUT for this identity


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def plan_stages(
    data: ExportData,
    roles: list[str],
    stage: str,
    existing: dict | None,
    force: bool,
    *,
    skip_empty: bool = False,
) -> Plan:
    """Which stages to train. The generator gets DPO only with `--stage dpo` (the paper trains
    it with SFT only); a role without DPO pairs gets SFT and a note, or with `--stage dpo`,
    where there would be nothing to train for it, an error (a note with `skip_empty`: `--role
    all` trains the roles that have data)."""
    stages: list[Stage] = []
    skipped: dict[str, str] = {}
    done: list[str] = []
    have = set((existing or {}).get("adapters", {})) if not force else set()
    for role in roles:
        wanted = ["sft", "dpo"] if stage == "all" else [stage]
        if stage == "all" and role == "generator":
            wanted = ["sft"]
        for s in wanted:
            name = f"{role}-{s}"
            if s == "dpo" and not data.dpo.get(role):
                why = f"{role}.dpo.jsonl has no pairs (no sibling with another label)"
                if stage == "dpo" and not skip_empty:
                    raise MaltError(f"{why}: no DPO to train for the {role}")
                skipped[name] = why
                continue
            if name in have:
                done.append(name)
                continue
            stages.append(Stage(role, s))
    return Plan(stages, skipped, done)


def _check_out(out: Path, ident: str, force: bool) -> dict | None:
    """The manifest of an OUT of this identity (to add to), None for a new OUT; refuses an OUT
    holding anything else unless --force."""
    if out.exists() and not out.is_dir():
        raise MaltError(f"--out {out} is a file")
    partial = partial_dir(out)
    if partial.exists() and not force:
        try:
            state = json.loads((partial / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if state.get("fingerprint") != ident:
            raise MaltError(
                f"{partial} holds an interrupted training of other data or settings: rerun "
                "that command to finish it, or pass --force to discard it"
            )
    if not out.exists() or not any(out.iterdir()):
        return None
    manifest = read_manifest(out)
    if force:
        return None
    if manifest is None:
        raise MaltError(f"--out {out} is not empty and holds no malt train adapters (--force)")
    if manifest.get("fingerprint") != ident:
        raise MaltError(
            f"--out {out} holds adapters trained on other data or settings (--force replaces them)"
        )
    return manifest


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"malt": __version__}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _base_identity(base: Base) -> dict:
    if base.kind == "gguf":
        return {"kind": "gguf", "sha256": base.sha256}
    config = (base.path / "config.json").read_bytes()
    import hashlib

    return {
        "kind": "hf",
        "path": str(base.path.resolve()),
        "config": hashlib.sha256(config).hexdigest(),
    }


def train(
    export_dir: Path,
    out: Path,
    *,
    roles: list[str],
    stage: str,
    settings: TrainSettings,
    base_path: Path | None = None,
    device: str = "auto",
    force: bool = False,
    report_to: str | None = None,
    on_event: Events | None = None,
    skip_empty_roles: bool = False,
    max_cut_share: float = MAX_CUT_SHARE,
) -> dict:
    """Train the planned stages and return the adapters' manifest (also written to OUT).

    `skip_empty_roles` (`--role all`): a role with no SFT lines is left out, told as one
    "skip_roles" event and recorded in the manifest's `skipped_roles`, instead of stopping the
    roles that have data; it is still an error when no role has any.

    Every row of the stages to train is tokenized first: a stage where more than
    `max_cut_share` of the rows are longer than `settings.max_length` is refused, and each
    adapter records its limit, longest row and rows cut (lengths.py)."""
    from malt_local.training import require_extra

    require_extra()
    quiet_libraries()
    settings.validate()
    check_share(max_cut_share)
    for role in roles:
        if role not in ROLES:
            raise MaltError(f"unknown role '{role}' (roles: {', '.join(ROLES)})")
    stages_read = ["sft", "dpo"] if stage in ("all", "dpo") else ["sft"]
    data = load_export(export_dir, roles, stages_read, skip_empty=skip_empty_roles)
    roles = [r for r in roles if r not in data.skipped]
    # Refuses DPO-only with no pairs, early.
    plan_stages(data, roles, stage, None, False, skip_empty=skip_empty_roles)
    base = resolve_base(data, base_path)
    ident = fingerprint(data.manifest_sha256, _base_identity(base), settings.record())
    existing = _check_out(out, ident, force)
    plan = plan_stages(data, roles, stage, existing, force, skip_empty=skip_empty_roles)
    emit = on_event or (lambda event, info: None)
    if data.skipped:
        emit("skip_roles", {"roles": dict(data.skipped)})
    for name, why in plan.skipped.items():
        emit("skip", {"stage": name, "why": why})
    for name in plan.done:
        emit("done", {"stage": name})
    if not plan.stages:
        if existing is None:
            why = "; ".join(plan.skipped.values())
            raise MaltError(f"nothing to train ({why})" if why else "nothing to train")
        return existing
    lengths = _measure(base, data, plan.stages, settings, max_cut_share)
    emit("lengths", {name: m.record() for name, m in lengths.items()})
    run_device = pick_device(device)
    partial = partial_dir(out)
    if force and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / STATE).write_text(json.dumps({"fingerprint": ident}), encoding="utf-8")
    # Stages DPO builds on: trained now (in partial) or before (in OUT).
    sources = {name: out / name for name in plan.done}
    results: dict[str, dict] = {}
    started = time.monotonic()
    model = tokenizer = None
    for st in plan.stages:
        finished = partial / st.name / "result.json"
        if finished.is_file():
            results[st.name] = json.loads(finished.read_text(encoding="utf-8"))
            sources[st.name] = partial / st.name / "adapter"
            emit("done", {"stage": st.name})
            continue
        if model is None:
            emit("load", {"base": str(base.path)})
            model, tokenizer = load_base(base, run_device)
        results[st.name] = _train_one(
            st,
            data,
            base,
            model,
            tokenizer,
            settings,
            lengths[st.name],
            partial,
            run_device,
            sources,
            report_to,
            emit,
        )
        sources[st.name] = partial / st.name / "adapter"
        # A fresh base for the next stage: the trainers wrap and modify the model they get.
        model, tokenizer = load_base(base, run_device)
    manifest = _manifest(
        existing, ident, data, base, settings, run_device, plan, results, partial, started
    )
    _publish(partial, out, plan, manifest, replace=force)
    return manifest


def _train_one(
    st: Stage,
    data: ExportData,
    base: Base,
    model,
    tokenizer,
    settings: TrainSettings,
    lengths: StageLengths,
    partial: Path,
    device: str,
    sources: dict[str, Path],
    report_to: str | None,
    emit: Events,
) -> dict:
    # The limit the stage trains with: --max-length, or its longest row.
    settings = dataclasses.replace(settings, max_length=lengths.max_length)
    from malt_local.training.base_model import hf_folder
    from malt_local.training.gguf_lora import BaseShape, convert
    from malt_local.training.trainer import merged_sft_model, train_stage

    folder = partial / st.name
    rows = data.sft[st.role] if st.stage == "sft" else data.dpo[st.role]
    if st.stage == "dpo":
        sft = sources.get(f"{st.role}-sft")
        if sft is None:
            raise MaltError(f"no {st.role} SFT adapter to start DPO from: train --stage sft first")
        model = merged_sft_model(model, sft)
    emit("stage", {"stage": st.name, "rows": len(rows)})

    def on_step(step: int, total: int, loss: float | None) -> None:
        emit("step", {"stage": st.name, "step": step, "total": total, "loss": loss})

    trained, result = train_stage(
        st.stage,
        st.name,
        model,
        tokenizer,
        rows,
        settings,
        folder / "checkpoints",
        device,
        report_to=report_to,
        on_step=on_step,
    )
    adapter = folder / "adapter"
    tmp = folder / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trained.save_pretrained(str(tmp), selected_adapters=["default"])
    shutil.rmtree(adapter, ignore_errors=True)
    os.rename(tmp, adapter)
    config = json.loads((hf_folder(base) / "config.json").read_text(encoding="utf-8"))
    gguf_path = convert(adapter, folder / f"{st.name}.gguf", BaseShape.from_config(config))
    from malt_local.hashing import sha256_file

    new_steps = max(result.steps - result.resumed_from_step, 0)
    record = {
        "role": st.role,
        "stage": st.stage,
        "peft": st.name,
        "gguf": gguf_path.name,
        "gguf_sha256": sha256_file(gguf_path),
        "rows": result.rows,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "loss": [[s, loss] for s, loss in result.losses],
        "margins": [[s, m] for s, m in result.margins],
        "reward_accuracies": [[s, a] for s, a in result.reward_accuracies],
        "seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds / new_steps, 3) if new_steps else None,
        "learning_rate": settings.lr if st.stage == "sft" else settings.dpo_lr,
        "reference": f"{st.role}-sft" if st.stage == "dpo" else None,
        **lengths.record(),
    }
    (folder / "result.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    emit("trained", {"stage": st.name, **record})
    return record


def _measure(
    base: Base, data: ExportData, stages: list[Stage], settings: TrainSettings, share: float
) -> dict[str, StageLengths]:
    """Each stage's rows in tokens, before any weights load (refuses too many cut rows)."""
    from malt_local.training.base_model import load_tokenizer

    tokenizer = load_tokenizer(base)
    return {
        st.name: measure(
            tokenizer,
            st.name,
            st.stage,
            data.sft[st.role] if st.stage == "sft" else data.dpo[st.role],
            settings.max_length,
            share,
        )
        for st in stages
    }


def _manifest(
    existing: dict | None,
    ident: str,
    data: ExportData,
    base: Base,
    settings: TrainSettings,
    device: str,
    plan: Plan,
    results: dict[str, dict],
    partial: Path,
    started: float,
) -> dict:
    from malt_local.training.base_model import dtype_for

    adapters = dict((existing or {}).get("adapters", {}))
    adapters.update(results)
    skipped = {k: v for k, v in ((existing or {}).get("skipped", {}) | plan.skipped).items()}
    for name in adapters:
        skipped.pop(name, None)
    trained_roles = {info["role"] for info in adapters.values()}
    skipped_roles = {
        role: why
        for role, why in ((existing or {}).get("skipped_roles", {}) | data.skipped).items()
        if role not in trained_roles
    }
    return {
        "tool": TOOL,
        "manifest_version": MANIFEST_VERSION,
        "fingerprint": ident,
        "export": {
            "folder": str(data.folder.resolve()),
            "manifest_sha256": data.manifest_sha256,
            "files": dict(sorted(data.files.items())),
            "model": data.model.__dict__ if data.model else None,
            # The prompts the trees were made with: `malt eval --adapters` compares its own.
            "prompts_sha256": sorted(
                {
                    src["prompts_sha256"]
                    for src in data.manifest.get("sources") or []
                    if isinstance(src, dict) and isinstance(src.get("prompts_sha256"), str)
                }
            ),
        },
        "base": base.record(),
        "settings": settings.record(),
        "device": device,
        "dtype": str(dtype_for(device)).replace("torch.", ""),
        "versions": _versions(),
        "adapters": dict(sorted(adapters.items())),
        "skipped": dict(sorted(skipped.items())),
        "skipped_roles": dict(sorted(skipped_roles.items())),
        "apply": apply_order(adapters),
        "seconds": round(time.monotonic() - started, 3),
    }


def _publish(partial: Path, out: Path, plan: Plan, manifest: dict, *, replace: bool) -> None:
    """Move each new stage's PEFT folder and GGUF file into OUT, each whole, then the
    manifest; with `replace` (--force) an old OUT goes only once the new one is complete."""
    target = out
    if replace and out.exists():
        target = out.with_name(out.name + ".new")
        shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for st in plan.stages:
        folder = partial / st.name
        dest = target / st.name
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(folder / "adapter", dest)
        os.replace(folder / f"{st.name}.gguf", target / f"{st.name}.gguf")
    write_manifest(target, manifest)
    if target != out:
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(target, out)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)


def quiet_libraries() -> None:
    """Offline, and no library chatter on stderr: the progress display is malt's.

    HF_HUB_OFFLINE makes sure nothing reaches for the network (every path here is local)."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # OpenMP threads that spin while waiting burn several times the CPU of the work itself on
    # a busy machine (measured: 20 s against 3 s of CPU a step on 2 shared cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|trl|peft)\b.*")
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
