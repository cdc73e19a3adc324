"""What `malt status` and `malt show` read from the database: plain dicts, which are the
`--json` output and what the CLI draws (`malt_local.cli.status`, `malt_local.cli.show`).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from malt_local.db.store import Store
from malt_local.errors import MaltError
from malt_local.roles import ROLES, nodes_per_role, tree_size
from malt_local.run.too_long import skipped_in_run


def open_for_status(db_path: Path) -> Store:
    """The database as `status` and `show` read it: opened normally (an older file is
    migrated), or, where it cannot be written (read-only media, a folder without write
    permission, a WAL file without its `-shm`), read-only as `malt view` opens it."""
    try:
        return Store(db_path, create=False)
    except MaltError as exc:
        from malt_local.view.storage import open_read_only

        # Only SQLite failing to open or write the file; a refusal (a newer malt's schema)
        # stands.
        if not (db_path.is_file() and isinstance(exc.__cause__, sqlite3.OperationalError)):
            raise
        try:
            return open_read_only(db_path)
        except MaltError:
            raise exc from None


def status(db_path: Path, run_id: str | None = None) -> dict:
    store = open_for_status(db_path)
    try:
        runs = store.runs()
        if run_id is not None:
            runs = [r for r in runs if r["id"] == run_id]
            if not runs:
                raise MaltError(f"no run '{run_id}' in {db_path}")
        return {"db": str(db_path), "runs": [run_status(store, r) for r in runs]}
    finally:
        store.close()


def run_status(store: Store, run: dict) -> dict:
    db = store.db
    n = run["n"]
    too_long = skipped_in_run(store, run["id"])
    # Questions skipped as too long get no tree: they are listed, not expected.
    n_questions = db.execute(
        "SELECT COUNT(*) FROM run_questions WHERE run_id = ?", [run["id"]]
    ).fetchone()[0]
    n_trees = n_questions - len(too_long)
    roles = {}
    for row in db.execute(
        """SELECT role, COUNT(*), SUM(label = 1), SUM(label IS NOT NULL), AVG(correct),
                  SUM(prompt_tokens), SUM(completion_tokens), SUM(duration_ms)
           FROM nodes WHERE run_id = ? GROUP BY role""",
        [run["id"]],
    ):
        role, count, pos, labelled, acc, ptok, ctok, ms = row
        roles[role] = {
            "nodes": count,
            "expected": n_trees * nodes_per_role(n, role),
            "labelled": labelled or 0,
            "positives": pos or 0,
            "positive_rate": (pos or 0) / labelled if labelled else None,
            "accuracy": acc,
            "prompt_tokens": ptok or 0,
            "completion_tokens": ctok or 0,
            "generation_seconds": (ms or 0) / 1000,
        }
    for role in ROLES:
        roles.setdefault(
            role,
            {
                "nodes": 0,
                "expected": n_trees * nodes_per_role(n, role),
                "labelled": 0,
                "positives": 0,
                "positive_rate": None,
                "accuracy": None,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "generation_seconds": 0.0,
            },
        )
    leaf = db.execute(
        "SELECT AVG(reward) FROM nodes WHERE run_id = ? AND role = 'refiner'", [run["id"]]
    ).fetchone()[0]
    complete = db.execute(
        """SELECT COUNT(*) FROM (SELECT question_id FROM nodes WHERE run_id = ? AND depth = 3
           GROUP BY question_id HAVING COUNT(*) = ?)""",
        [run["id"], n**3],
    ).fetchone()[0]
    span = db.execute(
        "SELECT MIN(created_at), MAX(created_at) FROM nodes WHERE run_id = ?", [run["id"]]
    ).fetchone()
    done = sum(r["nodes"] for r in roles.values())
    return {
        "run_id": run["id"],
        "created_at": run["created_at"],
        "model": run["model"],
        "model_sha256": run["model_sha256"],
        "n": n,
        "theta": run["theta"],
        "temperature": run["temperature"],
        "max_tokens": run["max_tokens"],
        "questions": n_questions,
        "questions_complete": complete,
        "too_long": too_long,
        "nodes": done,
        "nodes_expected": n_trees * tree_size(n),
        "leaf_accuracy": leaf,
        "completion_tokens": sum(r["completion_tokens"] for r in roles.values()),
        "prompt_tokens": sum(r["prompt_tokens"] for r in roles.values()),
        "generation_seconds": sum(r["generation_seconds"] for r in roles.values()),
        "first_node_at": span[0],
        "last_node_at": span[1],
        "roles": {role: roles[role] for role in ROLES},
    }


def tree(db_path: Path, question_id: str, run_id: str | None = None) -> dict:
    store = open_for_status(db_path)
    try:
        matches = store.find_question(question_id)
        if not matches:
            raise MaltError(f"no question '{question_id}' in {db_path} (see `malt status`)")
        if len(matches) > 1:
            raise MaltError(
                f"'{question_id}' matches {len(matches)} questions; give more of the id"
            )
        q = matches[0]
        if run_id is None:
            row = store.db.execute(
                """SELECT run_id FROM nodes WHERE question_id = ? ORDER BY created_at DESC
                   LIMIT 1""",
                [q["id"]],
            ).fetchone()
            if row is None:
                raise MaltError(f"question {q['id']} has no nodes yet")
            run_id = row[0]
        nodes = [
            {
                "id": r.id,
                "parent_id": r.parent_id,
                "role": r.role,
                "path": r.path,
                "output": r.output,
                "answer": r.answer,
                "correct": r.correct,
                "reward": r.reward,
                "value": r.value,
                "label": r.label,
                "finish_reason": r.finish_reason,
                "completion_tokens": r.completion_tokens,
                "grade_reason": r.grade_reason,
            }
            for r in store.nodes(run_id, q["id"])
        ]
        return {
            "run_id": run_id,
            "question_id": q["id"],
            "question": q["question"],
            "ground_truth": q["ground_truth"],
            "task": q["task"],
            "options": json.loads(q["options"]) if q["options"] else None,
            "nodes": nodes,
        }
    finally:
        store.close()
