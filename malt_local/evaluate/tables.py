"""Where `malt eval` keeps its work: the tables of migration m003_eval.

`eval_runs` (one row per evaluation identity: model by sha256, sampling settings, seed, task,
prompts; its id is a hash of those, so re-running the same command resumes it),
`eval_adapter_sets` (the base set and each adapter set used, with path, sha256 and scale per
role), `eval_samples` (which questions each benchmark's seed sampled) and `eval_generations`
(every generated turn, with an id that is its place: eval run, adapter set, seed index,
question, pass, role). A generation is inserted in its own transaction as soon as it arrives;
a resumed evaluation generates only what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from malt_local.db.store import Store, utcnow
from malt_local.evaluate.benchmarks import AdapterSet
from malt_local.questions.loading import Question


@dataclass
class EvalGeneration:
    """One row of `eval_generations`: one turn of one pass."""

    id: str
    eval_run_id: str
    adapter_set: str
    seed_index: int
    question_id: str
    pass_index: int
    role: str
    parent_id: str | None
    messages: str
    output: str
    finish_reason: str
    answer: str | None
    correct: int | None
    prompt_tokens: int
    completion_tokens: int
    seed: int
    duration_ms: int | None
    created_at: str
    # Why it got its grade, where the task says (the code task: "passed", "timed out ...").
    grade_reason: str | None = None


def ensure_eval_run(store: Store, row: dict) -> dict:
    with store.db.atomic():
        store.db.execute(
            "INSERT OR IGNORE INTO eval_runs ("
            + ", ".join(row)
            + ") VALUES ("
            + ", ".join("?" for _ in row)
            + ")",
            list(row.values()),
        )
    return next(store.db.query("SELECT * FROM eval_runs WHERE id = ?", [row["id"]]))


def ensure_adapter_set(store: Store, run_id: str, aset: AdapterSet) -> None:
    with store.db.atomic():
        store.db.execute(
            "INSERT OR IGNORE INTO eval_adapter_sets (eval_run_id, id, adapters, created_at) "
            "VALUES (?, ?, ?, ?)",
            [run_id, aset.id, json.dumps(aset.records, sort_keys=True), utcnow()],
        )


def record_samples(
    store: Store, run_id: str, label: str, seed_index: int, question_ids: Sequence[str]
) -> None:
    with store.db.atomic():
        store.db.conn.executemany(
            "INSERT OR REPLACE INTO eval_samples "
            "(eval_run_id, benchmark, seed_index, position, question_id) VALUES (?, ?, ?, ?, ?)",
            [(run_id, label, seed_index, pos, qid) for pos, qid in enumerate(question_ids)],
        )


def insert_generation(store: Store, gen: EvalGeneration) -> None:
    """One generation, one transaction: committed before the next one is generated."""
    with store.db.atomic():
        store.db["eval_generations"].insert(asdict(gen))


def set_generation_grade(
    store: Store, gid: str, answer: str | None, correct: int | None, reason: str
) -> None:
    """A turn's grade, given after it was stored (a `SlowGrading` task's pool)."""
    with store.db.atomic():
        store.db.conn.execute(
            "UPDATE eval_generations SET answer = ?, correct = ?, grade_reason = ? WHERE id = ?",
            (answer, correct, reason, gid),
        )


def load_generations(
    store: Store, run_id: str, question: Question | None = None
) -> dict[str, EvalGeneration]:
    """The run's stored turns (of one question only, when given)."""
    sql, args = "SELECT * FROM eval_generations WHERE eval_run_id = ?", [run_id]
    if question is not None:
        sql, args = sql + " AND question_id = ?", [*args, question.id]
    return {r["id"]: EvalGeneration(**r) for r in store.db.query(sql, args)}
