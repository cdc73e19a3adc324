"""The documented schema: users query these columns, so changing them is a breaking change."""

import sqlite3

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
    "grade_reason": "TEXT",
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


def test_invalid_utf8_text_reads_as_the_replacement_character_in_every_command(tmp_path):
    """A database written by another tool may hold TEXT that is not UTF-8: status, show and
    export read it with U+FFFD in place of the bad bytes, never a traceback."""
    from click.testing import CliRunner

    from malt_local.cli import cli
    from tests.test_export import GOLD_A, Q_A, Q_B, build

    db = tmp_path / "bad.db"
    build(db, [Q_A, Q_B], {Q_A.id: GOLD_A, Q_B.id: {"0.0.0"}}).close()
    with sqlite3.connect(db) as conn:
        for path in ("0", "0.0", "0.0.0"):  # a positive of every role, exported below
            conn.execute(
                "UPDATE nodes SET output = CAST(x'80ff' AS TEXT) || output WHERE id = ?",
                [f"rgold/{Q_A.id}/{path}"],
            )
        conn.execute(
            "UPDATE questions SET question = question || CAST(x'80ff' AS TEXT) WHERE id = ?",
            [Q_A.id],
        )
    conn.close()
    runner = CliRunner()
    for argv in (["status"], ["status", "--json"], ["show", Q_A.id], ["show", "--json", Q_A.id]):
        r = runner.invoke(cli, [*argv, "--db", str(db)])
        assert r.exit_code == 0, (argv, r.output, r.exception)
        if argv[0] == "show":
            assert "\ufffd" in r.stdout or "\\ufffd" in r.stdout, argv
    out = tmp_path / "out"
    r = runner.invoke(cli, ["export", "--db", str(db), "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    written = "".join(p.read_text(encoding="utf-8") for p in out.rglob("*.jsonl"))
    assert "\ufffd" in written or "\\ufffd" in written
    # What was stored is as it was: the replacement is only in what malt reads.
    with sqlite3.connect(db) as conn:
        raw = conn.execute(
            "SELECT CAST(output AS BLOB) FROM nodes WHERE id = ?", [f"rgold/{Q_A.id}/0"]
        ).fetchone()[0]
    conn.close()
    assert raw.startswith(b"\x80\xff")
