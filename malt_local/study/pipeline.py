"""`malt study`: the paper's protocol as one resumable command, over the stages' own functions.

Trees on the train split (`run_tree`), the per-role data (`export`), one adapter per role
(`train`), the base model and the adapters on the held-out split (`run_eval`, once for each
configuration), then the report (`malt_local.study.results`). There is no second implementation
of any stage: the study only chooses their inputs and folders, all inside OUT:

    OUT/study.toml   the config, written when the study begins
    OUT/state.json   which stages are finished, their time and what they said
    OUT/trees.db     the trees (malt run's database)
    OUT/export/      malt export's files
    OUT/adapters/    malt train's adapters
    OUT/eval.db      malt eval's database: every test-time turn of every configuration
    OUT/results.json, OUT/REPORT.md, OUT/figures/*.svg

Every stage resumes on its own (the trees and the evaluation node by node, training from its
checkpoints, export and the report are written whole or not at all), and a stage recorded as
finished in state.json is not run again: the same command after Ctrl-C or kill -9 goes on from
the stage it was in. A stage's seconds add up over its pieces: an interrupted piece is counted
when it is interrupted (kill -9 loses only the piece it cut). A setting of a stage that has not
begun may still change (a learning rate chosen on the finished export); the change is written
into study.toml and listed in state.json's "changes".
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.hashing import sha256_file
from malt_local.paths import write_text_atomic
from malt_local.progress import Progress
from malt_local.roles import ROLES
from malt_local.study.config import StudyConfig, differences, read_toml, to_toml

STAGES = ("trees", "export", "train", "eval", "report")
CONFIG = "study.toml"
STATE = "state.json"
# The configurations evaluated besides the base model: all roles trained (SFT, then DPO where
# malt train does it), and the ablations.
MALT = "malt"
ABLATIONS = ("sft", *ROLES)

# (kind, info): "stage" {name, index, total} when a stage begins, "skip" {name} for one already
# finished, "progress" {stage, progress: Progress}, "train" {event, info} (malt train's own
# events), "eval_config" {name, index, total}, "done" {name, seconds}.
Events = Callable[[str, dict], None]


@dataclass(frozen=True)
class Paths:
    out: Path

    @property
    def config(self) -> Path:
        return self.out / CONFIG

    @property
    def state(self) -> Path:
        return self.out / STATE

    @property
    def trees(self) -> Path:
        return self.out / "trees.db"

    @property
    def export(self) -> Path:
        return self.out / "export"

    @property
    def adapters(self) -> Path:
        return self.out / "adapters"

    @property
    def eval(self) -> Path:
        return self.out / "eval.db"


def load_state(paths: Paths) -> dict:
    if not paths.state.is_file():
        return {"stages": {}}
    try:
        return json.loads(paths.state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MaltError(f"{paths.state} cannot be read: {exc}") from None


def save_state(paths: Paths, state: dict) -> None:
    write_text_atomic(paths.state, json.dumps(state, indent=2, sort_keys=True) + "\n")


def begun_stages(paths: Paths, state: dict) -> set[str]:
    """The stages that have run at all: recorded in state.json, or with output on disk."""
    begun = set(state.get("stages", {}))
    outputs = {
        "trees": [paths.trees],
        "export": [paths.export],
        "train": [paths.adapters, paths.out / "adapters.partial"],
        "eval": [paths.eval],
    }
    begun |= {stage for stage, found in outputs.items() if any(p.exists() for p in found)}
    return begun


def resolve_config(out: Path, given: StudyConfig | None) -> StudyConfig:
    """The study in OUT, or `given` for a new one. `given` contradicting a setting of a stage
    that has begun is refused; a setting of a stage still to come is taken and recorded."""
    paths = Paths(out)
    stored = read_toml(paths.config) if paths.config.is_file() else None
    if stored is None:
        if given is None:
            raise MaltError(f"no study in {out}: give --train, --test and --model (or --config)")
        given.validate()
        return given
    if given is not None:
        state = load_state(paths)
        refused, accepted = differences(stored, given, begun_stages(paths, state))
        if refused:
            raise MaltError(
                f"the study in {out} was begun with {refused[0]}"
                + (f" and {len(refused) - 1} more" if len(refused) > 1 else "")
                + ": use another --out for another study"
            )
        if accepted:
            given.validate()
            state.setdefault("changes", []).append({"at": _now(), "settings": accepted})
            write_text_atomic(paths.config, to_toml(given))
            save_state(paths, state)
            return given
    stored.validate()
    return stored


def check_disjoint(train: list, test: list) -> None:
    """A test question that is also a train question measures memory, not MALT: refused.
    Questions are compared by text, case and spacing aside, so a copy with another answer or
    option order is caught too."""

    def key(q) -> str:
        return " ".join(q.text.casefold().split())

    seen = {key(q) for q in train}
    shared = [q for q in test if key(q) in seen]
    if shared:
        raise MaltError(
            f"{len(shared)} of the {len(test)} test questions are also train questions "
            f"(the first: {shared[0].text[:60]!r}): a study needs disjoint splits "
            "(malt questions split)"
        )


def versions() -> dict:
    """The libraries a result depends on, and the machine it was measured on."""
    out: dict = {"python": platform.python_version()}
    for key, dist in (
        ("malt", "malt-local"),
        ("llama_cpp_python", "llama_cpp_python"),
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("peft", "peft"),
        ("trl", "trl"),
    ):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    out["machine"] = _cpu_name()
    import os

    out["cores"] = os.cpu_count() or 0
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_study(
    out: Path,
    given: StudyConfig | None,
    *,
    command: str = "",
    on_event: Events | None = None,
) -> dict:
    """Begin or continue the study in `out` and return its results (also in OUT/results.json).

    Everything a user can get wrong (the config, the files, overlapping splits, the model, the
    prompts) is checked before the first stage writes anything."""
    from malt_local.datasets.sources import load_source
    from malt_local.engines import EngineOptions
    from malt_local.engines.registry import identify_model
    from malt_local.prompts import PromptSet
    from malt_local.run.settings import prompts_digest

    emit = on_event or (lambda kind, info: None)
    config = resolve_config(out, given)
    paths = Paths(out)
    task = config.task or None
    train_qs = load_source(config.train, task)
    test_qs = load_source(config.test, task)
    check_disjoint(train_qs, test_qs)
    prompts = PromptSet(config.prompts or None)
    prompts.check([*train_qs, *test_qs])
    model = identify_model("batched", config.model, EngineOptions(max_tokens=config.max_tokens))
    files = {
        "train": {"path": config.train, "sha256": sha256_file(Path(config.train))},
        "test": {"path": config.test, "sha256": sha256_file(Path(config.test))},
    }
    files["train"]["questions"] = len(train_qs)
    files["test"]["questions"] = len(test_qs)
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(paths)
    if "files" in state:
        for split in ("train", "test"):
            if state["files"][split]["sha256"] != files[split]["sha256"]:
                raise MaltError(
                    f"the {split} file {config.train if split == 'train' else config.test} "
                    f"changed since the study in {out} began: use another --out"
                )
        if state["model"]["sha256"] != model.sha256:
            raise MaltError(f"--model is not the model the study in {out} began with")
    else:
        state.update(
            files=files,
            model={"path": model.model, "sha256": model.sha256},
            prompts={
                "dir": str(prompts.folder),
                "sha256": prompts_digest(prompts.hashes()),
            },
            environment=versions(),
            command=command,
            created_at=_now(),
        )
        if not paths.config.is_file():
            write_text_atomic(paths.config, to_toml(config))
        save_state(paths, state)
    runners = {
        "trees": lambda: _trees(config, paths, emit),
        "export": lambda: _export(config, paths),
        "train": lambda: _train(config, paths, emit),
        "eval": lambda: _eval(config, paths, len(test_qs), emit),
        "report": lambda: _report(config, paths, state),
    }
    for index, name in enumerate(STAGES):
        done = state["stages"].get(name)
        if done and done.get("finished"):
            emit("skip", {"name": name, "index": index, "total": len(STAGES)})
            continue
        emit("stage", {"name": name, "index": index, "total": len(STAGES)})
        entry = state["stages"].setdefault(name, {})
        entry.setdefault("started_at", _now())
        save_state(paths, state)
        started = time.monotonic()
        try:
            detail = runners[name]()
        except BaseException:
            # Ctrl-C, SIGTERM or an error: the piece's time is kept, the stage stays unfinished.
            entry["seconds"] = round(entry.get("seconds", 0.0) + time.monotonic() - started, 3)
            entry["interrupted"] = entry.get("interrupted", 0) + 1
            save_state(paths, state)
            raise
        entry.update(
            finished=True,
            seconds=round(entry.get("seconds", 0.0) + time.monotonic() - started, 3),
            finished_at=_now(),
            detail=detail,
        )
        save_state(paths, state)
        emit("done", {"name": name, "seconds": entry["seconds"]})
    return json.loads((paths.out / "results.json").read_text(encoding="utf-8"))


def _now() -> str:
    from malt_local.db.store import utcnow

    return utcnow()


def _progress(emit: Events, stage: str) -> Callable[[Progress], None]:
    return lambda p: emit("progress", {"stage": stage, "progress": p})


def _trees(config: StudyConfig, paths: Paths, emit: Events) -> dict:
    from malt_local.run.pipeline import run_tree
    from malt_local.run.settings import RunSettings

    settings = RunSettings(
        n=config.n,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        seed=config.seed,
        theta=config.theta,
        task=config.task or None,
    )
    summary = run_tree(
        config.train,
        settings,
        db_path=paths.trees,
        model_spec=config.model,
        prompts_dir=_prompts(config),
        on_progress=_progress(emit, "trees"),
    )
    return {
        "run_id": summary.run_id,
        "questions": summary.questions,
        "nodes": summary.nodes_total,
        "nodes_generated": summary.nodes_generated,
        "completion_tokens": summary.completion_tokens,
    }


def _prompts(config: StudyConfig) -> Path | None:
    """The prompt set as `--prompts` takes it: a folder, or the name of a shipped set."""
    return Path(config.prompts) if config.prompts else None


def _export(config: StudyConfig, paths: Paths) -> dict:
    from malt_local.export.options import ExportOptions
    from malt_local.export.pipeline import export

    options = ExportOptions(formats=("sft", "dpo"), keep_length_stopped=config.keep_length_stopped)
    manifest = export(paths.trees, paths.export, options)
    return {"counts": manifest["counts"], "left_out": manifest["left_out"]}


def _train(config: StudyConfig, paths: Paths, emit: Events) -> dict:
    from malt_local.training.pipeline import train

    # The GGUF the trees were made with, as the study found it (an alias or a path): malt
    # train would otherwise need it registered with malt pull.
    base = Path(load_state(paths)["model"]["path"])
    manifest = train(
        paths.export,
        paths.adapters,
        roles=list(ROLES),
        stage="all",
        settings=config.train_settings(),
        base_path=base,
        on_event=lambda kind, info: emit("train", {"event": kind, "info": info}),
        skip_empty_roles=True,
    )
    return {
        "adapters": sorted(manifest["adapters"]),
        "skipped_roles": manifest.get("skipped_roles", {}),
    }


def adapter_configs(manifest: dict) -> dict[str, list[str]]:
    """The configurations to evaluate, as `--adapter ROLE=PATH` values, from malt train's
    manifest: `malt` (every adapter: SFT, then DPO), `sft` (SFT adapters only) and each role
    trained alone. A configuration no adapter belongs to is left out."""
    folder = Path(manifest["folder"])
    by_role: dict[str, list[tuple[str, str]]] = {}
    for info in manifest["adapters"].values():
        by_role.setdefault(info["role"], []).append((info["stage"], str(folder / info["gguf"])))
    for stages in by_role.values():
        stages.sort(key=lambda s: 0 if s[0] == "sft" else 1)

    def values(roles: tuple[str, ...], stages: tuple[str, ...]) -> list[str]:
        return [f"{r}={p}" for r in roles for s, p in by_role.get(r, []) if s in stages]

    out = {MALT: values(ROLES, ("sft", "dpo")), "sft": values(ROLES, ("sft",))}
    if out["sft"] == out[MALT]:
        del out["sft"]  # no DPO adapter: SFT only is the malt configuration itself
    for role in ROLES:
        out[role] = values((role,), ("sft", "dpo"))
    return {name: v for name, v in out.items() if v}


def eval_settings(config: StudyConfig, questions: int, votes: int):
    from malt_local.evaluate.settings import EvalSettings

    return EvalSettings(
        mode="all",
        votes=votes,
        samples=config.samples or questions,
        seeds=config.seeds,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        seed=config.seed,
        task=config.task or None,
    )


def _eval(config: StudyConfig, paths: Paths, questions: int, emit: Events) -> dict:
    from malt_local.evaluate.pipeline import run_eval
    from malt_local.training.manifest import identity_problem, read_manifest

    manifest = read_manifest(paths.adapters)
    if manifest is None:
        raise MaltError(f"{paths.adapters} has no adapters of malt train: rerun the study")
    state = load_state(paths)
    problem = identity_problem(
        paths.adapters, manifest, state["model"]["sha256"], state["prompts"]["sha256"]
    )
    if problem:
        raise MaltError(problem)
    manifest = {**manifest, "folder": str(paths.adapters)}
    configs = adapter_configs(manifest)
    if not config.ablations:
        configs = {MALT: configs[MALT]} if MALT in configs else {}
    if MALT not in configs:
        raise MaltError(f"no adapters in {paths.adapters} to evaluate")
    done: dict = {}
    for index, (name, values) in enumerate(configs.items()):
        emit("eval_config", {"name": name, "index": index, "total": len(configs)})
        votes = config.votes if name == MALT else config.ablation_votes
        result = run_eval(
            [config.test],
            eval_settings(config, questions, votes),
            db_path=paths.eval,
            model_spec=config.model,
            adapter_values=values,
            prompts_dir=_prompts(config),
            on_progress=_progress(emit, f"eval {name}"),
        )
        done[name] = {
            "eval_run": result["eval_run"],
            "adapter_set": result["adapter_set"],
            "votes": votes,
            "adapters": values,
            "seconds": result["seconds"],
        }
    return {"configs": done}


def _report(config: StudyConfig, paths: Paths, state: dict) -> dict:
    from malt_local.study.results import build_results, write_report

    results = build_results(config, paths, state)
    write_report(paths.out, results)
    return {"comparisons": len(results["eval"]["comparisons"])}
