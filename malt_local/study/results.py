"""From a finished study's folders to results.json, REPORT.md and the figures.

The test-time numbers are read back from `eval.db` through the evaluation's own pure measures
(`stored_chain`, `score_question`), question by question and seed by seed, because the paired
comparison needs each question's outcome under the base model and under the adapters, not only
the accuracies `malt eval` prints. The configurations are paired by construction: every one is
sampled with the same per-turn seeds (`generation_seed` depends on the place of a turn only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from malt_local.db.store import Store
from malt_local.errors import MaltError
from malt_local.evaluate.benchmarks import BASE, Slot, load_benchmarks, sample_indices
from malt_local.evaluate.results import stored_chain
from malt_local.evaluate.scores import QuestionScore, score_question
from malt_local.evaluate.tables import load_generations
from malt_local.paths import write_text_atomic
from malt_local.roles import ROLES
from malt_local.study.stats import Unit, paired_comparison, wilson

if TYPE_CHECKING:
    from malt_local.study.config import StudyConfig
    from malt_local.study.pipeline import Paths

MEASURES = ("sa", "sa_mv", "ma", "ma_mv")
LABELS = {
    "base": "base model",
    "malt": "MALT (all roles, SFT + DPO)",
    "sft": "all roles, SFT only",
    "generator": "only the generator trained",
    "verifier": "only the verifier trained",
    "refiner": "only the refiner trained",
}

# One configuration's outcome on every (seed, question): (question id, seed) -> score.
Scores = dict[tuple[str, int], QuestionScore]


def config_scores(
    store: Store, run_id: str, adapter_set: str, samples: list[list], votes: int
) -> Scores:
    """Each sampled question's measures under one configuration, from the stored turns."""
    stored = load_generations(store, run_id)
    out: Scores = {}
    for seed, questions in enumerate(samples):
        for q in questions:
            chains = [
                stored_chain(stored, run_id, adapter_set, Slot(seed, q, p), ROLES)
                for p in range(votes)
            ]
            if any(c is None for c in chains):
                raise MaltError(f"the evaluation of {adapter_set} is incomplete in {run_id}")
            out[(q.id, seed)] = score_question(chains, q)  # type: ignore[arg-type]
    return out


def measure(score: QuestionScore, name: str) -> bool:
    return bool(getattr(score, name))


def summary(scores: Scores, measures: tuple[str, ...], label: str, votes: int) -> dict:
    """Accuracy with Wilson intervals, turn-wise accuracy and flips of one configuration."""
    n = len(scores)
    correct = {m: sum(measure(s, m) for s in scores.values()) for m in measures}
    turns = [s.turns["ma"] for s in scores.values() if s.turns]
    return {
        "label": label,
        "votes": votes,
        "accuracy": {m: round(100.0 * k / n, 4) for m, k in correct.items()},
        "interval": {m: [round(x, 4) for x in wilson(k, n)] for m, k in correct.items()},
        "correct": {m: [k, n] for m, k in correct.items()},
        "turnwise": {
            name: round(100.0 * sum(t[i] for t in turns) / len(turns), 4) if turns else 0.0
            for i, name in enumerate(("after_generator", "after_verifier", "after_refiner"))
        },
        "flips": {
            "wrong_to_right": sum(1 for g, _, r in turns if not g and r),
            "right_to_wrong": sum(1 for g, _, r in turns if g and not r),
            "n": len(turns),
        },
    }


def compare(base: Scores, other: Scores, name: str, measures: tuple[str, ...]) -> list[dict]:
    out = []
    for m in measures:
        units = [
            Unit(question=qid, seed=seed, base=measure(base[qid, seed], m), other=measure(s, m))
            for (qid, seed), s in other.items()
        ]
        out.append({"config": name, "measure": m, **paired_comparison(units).as_dict()})
    return out


def build_results(config: StudyConfig, paths: Paths, state: dict) -> dict:
    """results.json: the setup, every stage's record and the paired comparisons."""
    from malt_local.training.manifest import read_manifest

    bench = load_benchmarks([config.test], config.task or None)[0]
    n = len(bench.questions)
    samples_per_seed = config.samples or n
    samples = [
        [bench.questions[i] for i in sample_indices(n, samples_per_seed, config.seed, s)]
        for s in range(config.seeds)
    ]
    evaluated = state["stages"]["eval"]["detail"]["configs"]
    configs: dict[str, dict] = {}
    comparisons: list[dict] = []
    store = Store(paths.eval, create=False)
    try:
        run_id = evaluated["malt"]["eval_run"]
        base_scores = {
            v: config_scores(store, run_id, BASE, samples, v)
            for v in sorted({c["votes"] for c in evaluated.values()})
        }
        configs["base"] = summary(base_scores[config.votes], MEASURES, LABELS["base"], config.votes)
        for name, info in evaluated.items():
            votes = info["votes"]
            measures = MEASURES if votes > 1 else ("sa", "ma")
            scores = config_scores(store, run_id, info["adapter_set"], samples, votes)
            configs[name] = summary(scores, measures, LABELS.get(name, name), votes)
            configs[name]["adapters"] = info["adapters"]
            comparisons += compare(base_scores[votes], scores, name, measures)
    finally:
        store.close()
    manifest = read_manifest(paths.adapters) or {}
    detail = state["stages"]
    return {
        "study": {
            "name": paths.out.name,
            "out": str(paths.out),
            "command": state.get("command", ""),
            "created_at": state.get("created_at"),
            "finished_at": detail.get("eval", {}).get("finished_at"),
            # Settings of stages still to come that changed after the study began.
            "changes": state.get("changes", []),
        },
        "config": config.record(),
        "environment": state.get("environment", {}),
        "model": state["model"],
        "prompts": state["prompts"],
        "data": state["files"],
        "stages": [
            {"name": name, "seconds": detail[name]["seconds"], "detail": detail[name]["detail"]}
            for name in ("trees", "export", "train", "eval")
            if name in detail
        ],
        "export": _export(detail["export"]["detail"]),
        "training": _training(manifest),
        "eval": {
            "questions": samples_per_seed,
            "seeds": config.seeds,
            "votes": config.votes,
            "configs": configs,
            "comparisons": comparisons,
        },
    }


def _export(detail: dict) -> dict:
    out = {}
    for role, counts in detail["counts"].items():
        out[role] = {
            "sft": counts.get("sft", 0),
            "dpo": counts.get("dpo", 0),
            "dropped": detail["left_out"].get(role, {}),
        }
    return out


def _training(manifest: dict) -> dict:
    out: dict[str, dict] = {}
    for info in (manifest.get("adapters") or {}).values():
        loss = info.get("loss") or []
        margins = info.get("margins") or []
        out.setdefault(info["role"], {})[info["stage"]] = {
            "steps": info["steps"],
            "rows": info.get("rows"),
            "learning_rate": info.get("learning_rate"),
            "seconds": info.get("seconds"),
            "loss_first": loss[0][1] if loss else None,
            "loss_last": loss[-1][1] if loss else None,
            "margin_first": margins[0][1] if margins else None,
            "margin_last": margins[-1][1] if margins else None,
            "curve": loss,
            "margins": margins,
        }
    return out


def write_report(out: Path, results: dict) -> None:
    """results.json, the figures and REPORT.md, each written whole."""
    from malt_local.study.report import figures, render_report

    for name, svg in figures(results).items():
        write_text_atomic(out / "figures" / name, svg)
    write_text_atomic(out / "REPORT.md", render_report(results))
    # Last: its presence is what says the study is finished.
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
