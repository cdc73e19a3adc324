"""The documented schema: users query these columns, so changing them is a breaking change."""

from malt_local.db.store import Store

NODES = {
    "id": "TEXT",
    "run_id": "TEXT",
    "question_id": "TEXT",
    "parent_id": "TEXT",
    "role": "TEXT",
    "depth": "INTEGER",
    "branch": "INTEGER",
    "path": "TEXT",
    "messages": "TEXT",
    "output": "TEXT",
    "finish_reason": "TEXT",
    "answer": "TEXT",
    "correct": "INTEGER",
    "reward": "REAL",
    "value": "REAL",
    "label": "INTEGER",
    "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER",
    "seed": "INTEGER",
    "duration_ms": "INTEGER",
    "created_at": "TEXT",
    "builder": "TEXT",
}
RUNS = {
    "id",
    "created_at",
    "model",
    "model_sha256",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "seed",
    "theta",
    "task",
    "prompts_sha256",
    "prompt_hashes",
    "tool_version",
    "config",
}
QUESTIONS = {
    "id",
    "task",
    "question",
    "ground_truth",
    "options",
    "source",
    "metadata",
    "created_at",
}


def test_schema_columns(tmp_path):
    store = Store(tmp_path / "s.db")
    db = store.db
    assert {c.name: c.type for c in db["nodes"].columns} == NODES
    assert {c.name for c in db["runs"].columns} == RUNS
    assert {c.name for c in db["questions"].columns} == QUESTIONS
    assert {c.name for c in db["run_questions"].columns} == {"run_id", "question_id", "position"}
    assert {c.name for c in db["claims"].columns} == {
        "scope", "run_id", "item", "holder", "expires_at", "done", "claimed_at"
    }  # fmt: skip
    fks = {(fk.column, fk.other_table) for fk in db["nodes"].foreign_keys}
    assert fks == {("run_id", "runs"), ("question_id", "questions"), ("parent_id", "nodes")}
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migrations_are_idempotent(tmp_path):
    Store(tmp_path / "s.db").close()
    store = Store(tmp_path / "s.db")
    names = [r["name"] for r in store.db.query("SELECT name FROM _sqlite_migrations")]
    assert names[0] == "m001_initial" and len(names) == len(set(names))
