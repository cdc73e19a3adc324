"""Databases across malt versions: the first release's schema is upgraded in place with every row
kept; a database from a newer malt is refused in one line."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from malt_local.db.store import Store
from tests.conftest import malt

FIRST_SCHEMA = Path(__file__).parent / "data" / "first_release_schema.sql"
OLD_TABLES = ("runs", "questions", "run_questions", "nodes")


def first_release_db(path: Path) -> None:
    """A database as malt's first release wrote it: its one migration, recorded by name."""
    old = Migrations("malt")

    @old(name="m001_initial")
    def m001_initial(db: Database) -> None:
        for statement in FIRST_SCHEMA.read_text().split(";"):
            if statement.strip(" \n").removeprefix("--").strip():
                db.execute("\n".join(x for x in statement.splitlines() if not x.startswith("--")))

    db = Database(path)
    db.enable_wal()
    old.apply(db)
    run = {
        "id": "r0ld",
        "created_at": "2026-11-23T11:00:00.000000+00:00",
        "model": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_sha256": "a" * 64,
        "n": 1,
        "temperature": 0.3,
        "top_p": 1.0,
        "top_k": 0,
        "max_tokens": 64,
        "seed": 0,
        "theta": 0.5,
        "task": "gsm8k",
        "prompts_sha256": "b" * 64,
        "prompt_hashes": json.dumps({"generator": "c" * 64}),
        "tool_version": "0.1.0",
        "config": json.dumps({"n": 1, "seed": 0}),
    }
    db["runs"].insert(run)
    for i, text in enumerate(["What is 2 + 2?", 'Ünïcödé ✓ question, with "quotes"\nand lines']):
        qid = f"q{i:012d}"
        db["questions"].insert(
            {
                "id": qid,
                "task": "gsm8k",
                "question": text,
                "ground_truth": str(4 + i),
                "options": None,
                "source": "old.jsonl",
                "metadata": json.dumps({"row": i}),
                "created_at": "2026-11-23T11:00:01.000000+00:00",
            }
        )
        db["run_questions"].insert({"run_id": "r0ld", "question_id": qid, "position": i})
        parent = None
        for depth, role in enumerate(("generator", "verifier", "refiner"), start=1):
            path = ".".join(["0"] * depth)
            nid = f"r0ld/{qid}/{path}"
            reward = float(i == 0) if depth == 3 else None
            db["nodes"].insert(
                {
                    "id": nid,
                    "run_id": "r0ld",
                    "question_id": qid,
                    "parent_id": parent,
                    "role": role,
                    "depth": depth,
                    "branch": 0,
                    "path": path,
                    "messages": json.dumps([{"role": "user", "content": text}]),
                    "output": f"{role} says {4 + i}",
                    "finish_reason": "stop",
                    "answer": str(4 + i),
                    "correct": int(i == 0),
                    "reward": reward,
                    "value": float(i == 0),
                    "label": int(i == 0),
                    "prompt_tokens": 10 * depth,
                    "completion_tokens": 5 * depth,
                    "seed": 1000 + depth,
                    "duration_ms": 12,
                    "created_at": f"2026-11-23T11:00:0{depth}.000000+00:00",
                }
            )
            parent = nid
    db.close()


def dump(path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(path)
    try:
        out = {}
        for table in OLD_TABLES:
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            # Columns later migrations added: the old rows must be kept, with them NULL.
            old_cols = [c for c in cols if c not in ("builder", "grade_reason")]
            out[table] = conn.execute(
                f"SELECT {', '.join(old_cols)} FROM {table} ORDER BY rowid"
            ).fetchall()
        return out
    finally:
        conn.close()


def test_first_release_database_is_upgraded_in_place_with_every_row_kept(tmp_path):
    db = tmp_path / "old.db"
    first_release_db(db)
    before = dump(db)
    assert sum(len(v) for v in before.values()) == 1 + 2 + 2 + 6

    Store(db).close()
    assert dump(db) == before
    conn = sqlite3.connect(db)
    names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations ORDER BY id")]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    builders = {r[0] for r in conn.execute("SELECT builder FROM nodes")}
    reasons = {r[0] for r in conn.execute("SELECT grade_reason FROM nodes")}
    conn.close()
    assert names[0] == "m001_initial" and len(names) == len(set(names)) > 1
    assert {"judgements", "eval_runs", "eval_generations", "claims"} <= tables
    assert builders == {None}  # made before claims: no builder recorded
    assert reasons == {None}  # graded when stored, before tasks gave reasons
    # The upgraded database reads as any other: status sees the old run's trees.
    r = malt("status", "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    assert json.dumps(json.loads(r.stdout)).count("r0ld") >= 1
    # A second open changes nothing.
    Store(db).close()
    assert dump(db) == before


def test_database_from_a_newer_malt_is_refused_in_one_line(tmp_path):
    db = tmp_path / "new.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('malt', 'm999_from_the_future', '2027-01-01')"
    )
    conn.commit()
    conn.close()
    size = db.stat().st_size
    for args in (["status"], ["export", "--out", str(tmp_path / "out")]):
        r = malt(*args, "--db", str(db))
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"Error: {db} was written by a newer malt (schema m999_from_the_future); "
            "upgrade malt to open it"
        ]
    assert db.stat().st_size == size and not (tmp_path / "out").exists()
