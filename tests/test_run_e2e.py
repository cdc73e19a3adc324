"""`malt run` end to end with the real SmolLM2-135M model, a real SQLite file, real processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from tests.conftest import EXAMPLES, default_signals, malt, run_argv

N = 2


def rows(db, sql, args=()):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def test_tree_counts_links_values_labels(real_run_db):
    nodes = rows(real_run_db, "SELECT * FROM nodes")
    (run,) = rows(real_run_db, "SELECT * FROM runs")
    theta = run["theta"]
    questions = rows(real_run_db, "SELECT * FROM questions")
    assert {q["task"] for q in questions} == {"gsm8k", "csqa"}
    per_q = defaultdict(list)
    for n in nodes:
        per_q[n["question_id"]].append(n)
    assert len(per_q) == len(questions) == 4
    by_id = {n["id"]: n for n in nodes}
    for qnodes in per_q.values():
        assert len(qnodes) == N + N**2 + N**3
        assert sorted(n["role"] for n in qnodes).count("refiner") == N**3
        for n in qnodes:
            if n["role"] == "generator":
                assert n["parent_id"] is None
            else:
                parent = by_id[n["parent_id"]]
                expected = {"verifier": "generator", "refiner": "verifier"}[n["role"]]
                assert parent["role"] == expected and parent["question_id"] == n["question_id"]
                # The prompt extends the parent's prompt with the parent's output.
                pm, cm = json.loads(parent["messages"]), json.loads(n["messages"])
                assert cm[: len(pm)] == pm and cm[len(pm)]["content"] == parent["output"]
        children = defaultdict(list)
        for n in qnodes:
            children[n["parent_id"]].append(n)
        for n in qnodes:
            if n["role"] == "refiner":
                assert n["reward"] in (0.0, 1.0) and n["value"] == n["reward"]
                assert n["reward"] == float(n["correct"])
            elif n["role"] == "verifier":
                kids = children[n["id"]]
                assert len(kids) == N
                assert n["value"] == pytest.approx(sum(k["reward"] for k in kids) / N)
            else:
                kids = children[n["id"]]
                assert len(kids) == N
                assert n["value"] == pytest.approx(sum(k["value"] for k in kids) / N)
            assert n["label"] == int(n["value"] > theta)
            assert n["prompt_tokens"] > 0 and n["completion_tokens"] > 0
    assert len({n["seed"] for n in nodes}) == len(nodes)
    # The small model gets some right and some wrong: credit assignment has work to do.
    rewards = {n["reward"] for n in nodes if n["role"] == "refiner"}
    assert rewards == {0.0, 1.0}


def test_rerun_of_a_complete_run_generates_nothing(real_run_db, tmp_path, small_model):
    db = tmp_path / "copy.db"
    conn = sqlite3.connect(real_run_db)
    conn.execute(f"VACUUM INTO '{db}'")
    conn.close()
    before = rows(db, "SELECT id, output, created_at FROM nodes ORDER BY id")
    r = malt(*run_argv(db, small_model, "--json", max_tokens=40, limit=4))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["nodes_generated"] == 0 and out["questions_complete"] == 4
    assert rows(db, "SELECT id, output, created_at FROM nodes ORDER BY id") == before

    # A different n against the same run is refused, and nothing is written.
    r = malt("run", "--n", "3", "--db", str(db), str(EXAMPLES / "questions.jsonl"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "n 2 (now 3)" in r.stderr and "--new-run" in r.stderr
    assert rows(db, "SELECT COUNT(*) c FROM runs")[0]["c"] == 1
    # Leaving flags out continues the run with its own settings.
    r = malt("run", "--db", str(db), "--limit", "4", str(EXAMPLES / "questions.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "0 nodes generated" in r.stdout


def test_appended_questions_only_add_new_trees(tmp_path, small_model):
    db = tmp_path / "grow.db"
    src = (EXAMPLES / "capitals.txt").read_text().splitlines()
    qfile = tmp_path / "q.txt"
    qfile.write_text(src[0] + "\n")
    args = ["run", "--n", "1", "--max-tokens", "12", "--model", str(small_model), "--db", str(db)]
    assert malt(*args, str(qfile)).returncode == 0
    first = rows(db, "SELECT id, output, created_at FROM nodes ORDER BY id")
    assert len(first) == 3
    qfile.write_text("\n".join(src[:2]) + "\n")
    r = malt(*args, "--json", str(qfile))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nodes_generated"] == 3
    after = rows(db, "SELECT id, output, created_at FROM nodes ORDER BY id")
    assert len(after) == 6 and all(n in after for n in first)
    assert rows(db, "SELECT COUNT(*) c FROM questions")[0]["c"] == 2


def _start(db, small_model, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "malt_local", *run_argv(db, small_model, *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
        preexec_fn=default_signals,
    )


def _wait_for_nodes(db, proc, count, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if db.exists():
            try:
                if rows(db, "SELECT COUNT(*) c FROM nodes")[0]["c"] >= count:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


def _check_complete(db, questions=3):
    nodes = rows(db, "SELECT * FROM nodes")
    ids = [n["id"] for n in nodes]
    assert len(ids) == len(set(ids)) == questions * (N + N**2 + N**3)
    by_id = set(ids)
    assert all(n["parent_id"] is None or n["parent_id"] in by_id for n in nodes)
    assert all(n["value"] is not None and n["label"] is not None for n in nodes)


def test_sigkill_then_resume_keeps_every_stored_node(tmp_path, small_model):
    db = tmp_path / "kill.db"
    proc = _start(db, small_model)
    _wait_for_nodes(db, proc, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = rows(db, "SELECT id, output, created_at, parent_id FROM nodes ORDER BY id")
    assert 9 <= len(before) < 42
    ids = {n["id"] for n in before}
    assert all(n["parent_id"] is None or n["parent_id"] in ids for n in before)

    r = malt(*run_argv(db, small_model, "--json"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nodes_generated"] == 42 - len(before)
    after = {n["id"]: n for n in rows(db, "SELECT id, output, created_at, parent_id FROM nodes")}
    for n in before:
        assert after[n["id"]] == n
    _check_complete(db)


@pytest.mark.parametrize(
    "sig,code,word",
    [(signal.SIGINT, 130, "Interrupted."), (signal.SIGTERM, 143, "Terminated.")],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_or_sigterm_stops_keeps_nodes_and_resumes(tmp_path, small_model, sig, code, word):
    db = tmp_path / "int.db"
    proc = _start(db, small_model)
    _wait_for_nodes(db, proc, 4)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == word and "Traceback" not in err
    kept = rows(db, "SELECT id, output, created_at FROM nodes ORDER BY id")
    assert len(kept) >= 4
    # Its claims were let go at once: the next process need not wait for a lease to lapse.
    assert not rows(db, "SELECT * FROM claims WHERE done = 0")
    proc = _start(db, small_model)
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    _check_complete(db)
    after = {n["id"]: n for n in rows(db, "SELECT id, output, created_at FROM nodes")}
    assert all(after[n["id"]] == n for n in kept)


ONE = '{"question": "a", "answer": "1"}\n'  # one good question


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ["missing.jsonl"], "questions file not found"),
        ("", ["q.jsonl"], "no questions"),
        ('{"question": "a", "answer": "1"}\n{oops\n', ["q.jsonl"], "q.jsonl:2: malformed JSON"),
        ('{"question": "a"}\n', ["q.jsonl"], "missing ground truth"),
        ('{"question": "a", "answer": "1"}\n', ["--task", "poetry", "q.jsonl"], "unknown task"),
        ('{"question": "a", "answer": "1"}\n', ["--n", "0", "q.jsonl"], "--n must be at least 1"),
        ('{"question": "a", "answer": "1"}\n', ["--max-tokens", "-5", "q.jsonl"], "--max-tokens"),
        ('{"question": "a", "answer": "1"}\n', ["--theta", "2", "q.jsonl"], "--theta"),
        ('{"question": "a", "answer": "1"}\n', ["--ctx", "100", "q.jsonl"], "--ctx 100 is too"),
        (ONE, ["--temperature", "nan", "q.jsonl"], "--temperature must be a finite"),
        (ONE, ["--temperature", "inf", "q.jsonl"], "--temperature must be a finite"),
        ('{"question": "a", "answer": "1"}\n', ["--top-p", "nan", "q.jsonl"], "--top-p"),
        (ONE, ["--top-k", str(10**22), "q.jsonl"], "--top-k must be in"),
        (ONE, ["--seed", str(10**22), "q.jsonl"], "--seed must be a 64-bit"),
        (ONE, ["--max-tokens", str(10**22), "q.jsonl"], "--max-tokens must be in"),
        ('{"question": "a", "answer": "1"}\n', ["--theta", "nan", "q.jsonl"], "--theta"),
        (ONE, ["--engine", "openai", "--endpoint", "http://[::1", "q.jsonl"], "is not an http"),
        (ONE, ["--engine", "openai", "--endpoint", "http://h:x", "q.jsonl"], "is not an http"),
        (
            ONE,
            [
                "--engine",
                "openai",
                "--endpoint",
                "http://127.0.0.1:9",
                "--request-timeout",
                "nan",
                "q.jsonl",
            ],
            "--request-timeout must be in [1, 604800] seconds",
        ),
        (
            '{"question": "a", "answer": "1"}\n',
            ["--model", "notgguf.bin", "q.jsonl"],
            "is not a GGUF model file",
        ),
        (
            '{"question": "a", "answer": "1"}\n',
            ["--model", "absent.gguf", "q.jsonl"],
            "does not exist",
        ),
        ('{"question": "a", "answer": "1"}\n', ["q.jsonl"], "no model"),
        ('{"question": "a", "answer": "1"}\n', ["--n", "x", "q.jsonl"], "'x' is not a valid"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, monkeypatch, setup, args, message):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        (tmp_path / "q.jsonl").write_text(setup)
    (tmp_path / "notgguf.bin").write_bytes(b"PK\x03\x04 not a model")
    result = CliRunner().invoke(cli, ["run", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not (tmp_path / "malt.db").exists()


def test_status_show_and_db_path(real_run_db):
    runner = CliRunner()
    r = runner.invoke(cli, ["status", "--db", str(real_run_db), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    (run,) = data["runs"]
    assert run["nodes"] == run["nodes_expected"] == 4 * 14
    assert run["questions_complete"] == 4
    leaves = rows(real_run_db, "SELECT AVG(reward) a FROM nodes WHERE role='refiner'")[0]["a"]
    assert run["leaf_accuracy"] == pytest.approx(leaves)
    assert run["roles"]["refiner"]["nodes"] == 32 and run["roles"]["generator"]["nodes"] == 8
    pos = rows(real_run_db, "SELECT SUM(label) s FROM nodes WHERE role='verifier'")[0]["s"]
    assert run["roles"]["verifier"]["positives"] == pos

    r = runner.invoke(cli, ["status", "--db", str(real_run_db)])
    assert r.exit_code == 0 and "refiner" in r.stdout and "leaf accuracy" in r.stdout

    qid = rows(real_run_db, "SELECT id FROM questions ORDER BY id LIMIT 1")[0]["id"]
    r = runner.invoke(cli, ["show", qid[:6], "--db", str(real_run_db), "--json"])
    assert r.exit_code == 0, r.output
    tree = json.loads(r.stdout)
    assert tree["question_id"] == qid and len(tree["nodes"]) == 14
    r = runner.invoke(cli, ["show", qid, "--db", str(real_run_db)], terminal_width=200)
    assert r.exit_code == 0 and "R1.1.1" in r.stdout and "ground truth" in r.stdout

    r = runner.invoke(cli, ["show", "qnope", "--db", str(real_run_db)])
    assert r.exit_code == 2 and "no question 'qnope'" in r.stderr

    r = runner.invoke(cli, ["db", "path", "--db", str(real_run_db)])
    assert r.stdout.strip() == str(real_run_db.resolve())


def test_status_without_database_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["status"])
    assert r.exit_code == 2 and "no database" in r.stderr
    assert not (tmp_path / "malt.db").exists()


def test_new_run_flag_starts_a_separate_run(real_run_db, tmp_path, small_model):
    db = tmp_path / "two.db"
    conn = sqlite3.connect(real_run_db)
    conn.execute(f"VACUUM INTO '{db}'")
    conn.close()
    r = malt(
        "run",
        "--n",
        "1",
        "--max-tokens",
        "8",
        "--new-run",
        "--limit",
        "1",
        "--model",
        str(small_model),
        "--db",
        str(db),
        str(EXAMPLES / "capitals.txt"),
    )
    assert r.returncode == 0, r.stderr
    runs = rows(db, "SELECT id, n FROM runs ORDER BY created_at")
    assert [x["n"] for x in runs] == [2, 1]
    assert rows(db, "SELECT COUNT(*) c FROM nodes WHERE run_id = ?", (runs[1]["id"],))[0]["c"] == 3
