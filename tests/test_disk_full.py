"""A disk that fills up during `malt run` and `malt export`: one line naming the file and the
free space, exit code 75, everything stored before kept, and the same command completes once
space is freed. On a real, really small filesystem (tests/smallfs.py); `malt pull`'s case is in
test_pull.py."""

from __future__ import annotations

import json
import re
import sqlite3

from malt_local.db.store import Store
from malt_local.errors import EXIT_DISK_FULL
from malt_local.prompts import PromptSet
from malt_local.questions.loading import load_questions
from malt_local.run.settings import Run
from malt_local.run.tree import TreeRunner
from tests.conftest import EXAMPLES, malt, run_argv
from tests.fakes import FakeEngine
from tests.smallfs import leave_free, small_filesystem
from tests.test_tree import make_run, script

N = 2
QUESTIONS = 3


def disk_full_line(stderr: str, path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert re.fullmatch(
        rf"Error: disk full writing {re.escape(str(path))} \(\d+(\.\d)? (B|KiB|MiB|GiB) free\); "
        r"everything written before is kept: free some space and run the same command again "
        r"to continue",
        lines[0],
    ), lines[0]


def nodes(db):
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # What generation wrote; values and labels are set later, when a tree is complete.
        sql = "SELECT id, output, messages, answer, reward, seed, created_at, builder FROM nodes"
        return {r[0]: r for r in conn.execute(sql)}
    finally:
        conn.close()


def test_run_on_a_filling_disk_stops_in_one_line_and_completes_after_space_is_freed(
    tmp_path, small_model
):
    with small_filesystem(tmp_path / "fs") as fs:
        db = fs / "malt.db"
        argv = run_argv(db, small_model, "--json", n=N, limit=QUESTIONS)
        # Room for the schema and some nodes (each commit appends pages to the WAL), not all.
        filler = leave_free(fs, 640 * 1024)
        r = malt(*argv)
        assert r.returncode == EXIT_DISK_FULL, r.stderr
        disk_full_line(r.stderr, db)
        before = nodes(db)
        assert 0 < len(before) < QUESTIONS * (N + N**2 + N**3)

        filler.unlink()
        r = malt(*argv)
        assert r.returncode == 0, r.stderr
        after = nodes(db)
        assert len(after) == QUESTIONS * (N + N**2 + N**3)
        assert all(after[nid] == row for nid, row in before.items())


def scripted_db(path):
    """Complete trees from the scripted engine: the export test is about writing files."""
    store = Store(path)
    questions = load_questions(EXAMPLES / "gsm8k.jsonl")
    run = make_run(store)
    store.add_questions(run["id"], questions)
    TreeRunner(store, Run.from_row(run), questions, FakeEngine(script), PromptSet()).execute()
    store.close()
    return path


def test_export_on_a_full_disk_leaves_no_files_and_completes_after_space_is_freed(tmp_path):
    real_run_db = scripted_db(tmp_path / "trees.db")
    with small_filesystem(tmp_path / "fs") as fs:
        out = fs / "export"
        filler = leave_free(fs, 24 * 1024)
        r = malt("export", "--db", str(real_run_db), "--out", str(out), "--role", "all")
        assert r.returncode == EXIT_DISK_FULL, r.stderr
        disk_full_line(r.stderr, out)
        assert [p.name for p in fs.iterdir()] == ["filler"]  # nothing half-written
        filler.unlink()
        r = malt("export", "--db", str(real_run_db), "--out", str(out), "--role", "all")
        assert r.returncode == 0, r.stderr
        assert (out / "manifest.json").is_file()


def test_eval_on_a_filling_disk_stops_in_one_line_and_completes_after_space_is_freed(
    tmp_path, small_model
):
    # Room, once freed, for the whole evaluation and its WAL (up to 4 MiB before a checkpoint).
    with small_filesystem(tmp_path / "fs", size="16m") as fs:
        db = fs / "eval.db"
        argv = [
            "eval", str(EXAMPLES / "questions.jsonl"), "--mode", "all", "--votes", "3",
            "--samples", "6", "--seeds", "1", "--max-tokens", "16", "--model", str(small_model),
            "--db", str(db), "--json",
        ]  # fmt: skip
        total = 6 * 3 * 3
        filler = leave_free(fs, 512 * 1024)
        r = malt(*argv)
        assert r.returncode == EXIT_DISK_FULL, r.stderr
        disk_full_line(r.stderr, db)
        sql = "SELECT id, output, created_at FROM eval_generations"
        before = {g[0]: g for g in sqlite3.connect(db).execute(sql)}
        assert 0 < len(before) < total
        filler.unlink()
        r = malt(*argv)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["generations_new"] == total - len(before)
        after = {g[0]: g for g in sqlite3.connect(db).execute(sql)}
        assert len(after) == total and all(after[k] == v for k, v in before.items())
