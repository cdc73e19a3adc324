"""Several processes on one database: claims, takeovers after kill -9, and the run they share.

The end-to-end tests start real `malt run` processes with the real small model on one SQLite
file; the unit tests pin the claim rules on a real database file with two holders.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from malt_local.db.claims import ClaimCursor, Claims
from malt_local.db.store import Store
from malt_local.prompts import PromptSet
from malt_local.questions.loading import load_questions
from malt_local.run.settings import Run
from malt_local.run.tree import TreeRunner
from tests.conftest import EXAMPLES, default_signals, run_argv
from tests.fakes import FakeEngine
from tests.test_tree import make_run, script

N = 2
QUESTIONS = 4  # the first of examples/questions.jsonl
# One thread each: several processes share the test machine's cores.
SMALL = ("--threads", "1")
MAX_TOKENS = 8
TREE = N + N**2 + N**3


def rows(db, sql, args=()):
    conn = sqlite3.connect(db, timeout=60)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


# --------------------------------------------------------------------------- claim rules


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.db")
    yield s
    s.close()


def test_a_live_claim_is_exclusive_and_a_lapsed_one_is_taken_over(store):
    a = Claims(store, "tree", "r1", holder="host:1:a", lease=60)
    b = Claims(store, "tree", "r1", holder="host:2:b", lease=60)
    assert a.try_take(["q1", "q2"]) == ("q1", [], [])
    # b passes over a's live claim and takes the next item.
    assert b.try_take(["q1", "q2"]) == ("q2", [], ["q1"])
    with store.immediate():
        assert a.keep("q1") and not b.keep("q1")
    a.finish("q1")
    assert b.try_take(["q1"]) == (None, ["q1"], [])  # done is done, whoever asks
    # b's lease lapses (its holder was killed): a takes q2 over, and b can no longer store.
    store.db.execute("UPDATE claims SET expires_at = 0 WHERE item = 'q2'")
    assert a.try_take(["q2"]) == ("q2", [], [])
    with store.immediate():
        assert not b.keep("q2") and a.keep("q2")
    # Other runs and scopes are separate.
    assert b.try_take(["q1"]) == (None, ["q1"], [])
    assert Claims(store, "judge", "r1", holder="host:2:b").try_take(["q1"])[0] == "q1"
    assert Claims(store, "tree", "r2", holder="host:2:b").try_take(["q1"])[0] == "q1"


def test_release_frees_unfinished_claims_only(store):
    a = Claims(store, "tree", "r1", holder="host:1:a", lease=60)
    b = Claims(store, "tree", "r1", holder="host:2:b", lease=60)
    a.try_take(["q1"])
    a.try_take(["q2"])
    a.finish("q1")
    a.release()
    assert b.try_take(["q1", "q2"]) == ("q2", ["q1"], [])
    owner = store.db.execute("SELECT holder, done FROM claims WHERE item = 'q1'").fetchone()
    assert owner == ("host:1:a", 1)


def test_heartbeat_renews_a_live_holders_lease(store):
    """The renewal is watched in the database, not raced against a sleep: on a loaded machine a
    thread can be late by more than a short lease, and the test must not depend on load."""

    def expires() -> float:
        return store.db.execute("SELECT expires_at FROM claims WHERE item = 'q1'").fetchone()[0]

    a = Claims(store, "tree", "r1", holder="host:1:a", lease=2.0)
    with a:
        a.try_take(["q1"])
        first = expires()
        deadline = time.monotonic() + 120
        while expires() < first + 1.0:  # renewed past its first lease: only the heartbeat does
            assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
            time.sleep(0.05)
        b = Claims(store, "tree", "r1", holder="host:2:b", lease=2.0)
        assert b.try_take(["q1"]) == (None, [], ["q1"])
    # Released on exit: free at once.
    assert b.try_take(["q1"]) == ("q1", [], [])


def test_cursor_revisits_items_held_elsewhere(store):
    a = Claims(store, "tree", "r1", holder="host:1:a", lease=60)
    b = Claims(store, "tree", "r1", holder="host:2:b", lease=60)
    a.try_take(["q2"])
    cursor = ClaimCursor(b, ["q1", "q2", "q3"])
    assert [cursor.next(), cursor.next(), cursor.next()] == ["q1", "q3", None]
    assert cursor.waiting  # q2 is a's, not done
    a.finish("q2")
    assert cursor.next() is None and not cursor.waiting


def test_runner_builds_only_free_questions_and_continues_a_dead_holders_tree(tmp_path):
    store = Store(tmp_path / "t.db")
    questions = load_questions(EXAMPLES / "gsm8k.jsonl")[:3]
    run = make_run(store)
    store.add_questions(run["id"], questions)
    q0, q1, q2 = (q.id for q in questions)
    # A dead process built part of q0's tree; its lease has lapsed.
    dead = Claims(store, "tree", run["id"], holder="host:9:dead", lease=60)
    dead.try_take([q0])
    first = FakeEngine(script, fail_after=3)
    runner = TreeRunner(store, Run.from_row(run), questions[:1], first, PromptSet())
    runner.claims.holder = "host:9:dead"
    with pytest.raises(KeyboardInterrupt):
        runner.execute()
    store.db.execute(
        "INSERT INTO claims VALUES ('tree', ?, ?, 'host:9:dead', 0, 0, 'x')", [run["id"], q0]
    )
    # Another process has built q1 and q2 (their claims are done, their trees stored).
    other = TreeRunner(store, Run.from_row(run), questions[1:], FakeEngine(script), PromptSet())
    other.claims.holder = "host:8:live"
    other.execute()
    assert {c[0] for c in store.db.execute("SELECT item FROM claims WHERE done = 1")} >= {q1, q2}
    engine = FakeEngine(script)
    runner = TreeRunner(store, Run.from_row(run), questions, engine, PromptSet())
    runner.execute()
    built = {k.split("/")[1] for k in engine.completed}
    assert built == {q0}
    nodes = list(store.nodes(run["id"], q0))
    assert len(nodes) == TREE
    by_builder = defaultdict(int)
    for n in nodes:
        by_builder[n.builder] += 1
    assert by_builder == {"host:9:dead": 3, runner.claims.holder: TREE - 3}
    assert store.db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 3 * TREE
    store.close()


# --------------------------------------------------------------------------- real processes


def _start(argv, env=None, **kwargs):
    proc = subprocess.Popen(
        [sys.executable, "-m", "malt_local", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )
    STARTED.append(proc)
    return proc


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """A failed test leaves no `malt` process behind to slow down the next ones."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _run(db, model, *extra):
    return run_argv(db, model, *SMALL, *extra, n=N, max_tokens=MAX_TOKENS, limit=QUESTIONS)


def _check_complete(db):
    nodes = rows(db, "SELECT * FROM nodes")
    ids = [n["id"] for n in nodes]
    assert len(ids) == len(set(ids)) == QUESTIONS * TREE
    per_q = defaultdict(list)
    for n in nodes:
        per_q[n["question_id"]].append(n)
    assert len(per_q) == QUESTIONS and all(len(v) == TREE for v in per_q.values())
    assert all(n["value"] is not None and n["label"] is not None for n in nodes)
    assert len(rows(db, "SELECT id FROM runs")) == 1
    return per_q


def test_two_processes_and_a_third_share_one_run(tmp_path, small_model):
    db = tmp_path / "shared.db"
    # --parallel 2: each process holds one question's work at a time, so both get some.
    procs = [_start(_run(db, small_model, "--parallel", "2", "--json")) for _ in range(2)]
    deadline = time.monotonic() + 300
    while not (db.exists() and _count(db) >= TREE):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    procs.append(_start(_run(db, small_model, "--parallel", "2", "--json")))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    results = [json.loads(out) for out, _ in outs]
    assert len({r["run_id"] for r in results}) == 1
    # Each process reports the whole run, and together they generated each node once.
    assert all(r["nodes_total"] == QUESTIONS * TREE for r in results)
    assert all(r["questions_complete"] == QUESTIONS for r in results)
    assert sum(r["nodes_generated"] for r in results) == QUESTIONS * TREE
    per_q = _check_complete(db)
    builders = set()
    for qnodes in per_q.values():
        (builder,) = {n["builder"] for n in qnodes}  # each tree built by one process
        builders.add(builder)
    pids = {int(b.split(":")[1]) for b in builders}
    assert pids <= {p.pid for p in procs} and len(pids) >= 2
    claims = rows(db, "SELECT * FROM claims WHERE scope = 'tree'")
    assert len(claims) == QUESTIONS and all(c["done"] == 1 for c in claims)
    assert {c["item"]: c["holder"] for c in claims} == {
        q: qnodes[0]["builder"] for q, qnodes in per_q.items()
    }


def _count(db, sql="SELECT COUNT(*) c FROM nodes", args=()):
    try:
        return rows(db, sql, args)[0]["c"]
    except sqlite3.OperationalError:
        return 0


def test_a_killed_process_s_questions_are_finished_by_the_others(tmp_path, small_model):
    db = tmp_path / "kill.db"
    env = {"MALT_CLAIM_LEASE": "3"}
    victim = _start(_run(db, small_model, "--parallel", "2"), env=env)
    survivor = _start(_run(db, small_model, "--parallel", "2", "--json"), env=env)
    mine = f"%:{victim.pid}:%"
    deadline = time.monotonic() + 300
    partial: list[str] = []
    while not partial:
        assert time.monotonic() < deadline and victim.poll() is None, "the victim made no node"
        with contextlib.suppress(sqlite3.OperationalError):
            partial = [
                r["question_id"]
                for r in rows(
                    db,
                    "SELECT question_id, COUNT(*) c FROM nodes WHERE builder LIKE ? "
                    "GROUP BY question_id HAVING c < ?",
                    [mine, TREE],
                )
            ]
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    before = {n["id"]: n for n in rows(db, "SELECT id, output, created_at, builder FROM nodes")}
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    assert json.loads(out)["questions_complete"] == QUESTIONS
    per_q = _check_complete(db)
    after = {n["id"]: n for qnodes in per_q.values() for n in qnodes}
    for nid, n in before.items():
        assert {k: after[nid][k] for k in n} == n
    taken_over = set(partial)
    for qid in taken_over:
        builders = {n["builder"] for n in per_q[qid]}
        assert any(f":{survivor.pid}:" in b for b in builders), builders
    # The victim's claims were taken over, not left behind.
    assert all(c["done"] == 1 for c in rows(db, "SELECT done FROM claims"))


def test_two_judge_passes_share_a_run(tmp_path, small_model):
    db = tmp_path / "judge.db"
    argv = run_argv(
        db, small_model, *SMALL, "--judge", "--json", n=1, max_tokens=MAX_TOKENS, limit=QUESTIONS
    )
    procs = [_start(argv) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    judged = [json.loads(out)["judge"] for out, _ in outs]
    leaves = rows(db, "SELECT id FROM nodes WHERE depth = 3")
    verdicts = rows(db, "SELECT node_id FROM judgements")
    assert len(leaves) == QUESTIONS
    assert sorted(v["node_id"] for v in verdicts) == sorted(n["id"] for n in leaves)
    assert sum(j["judged"] for j in judged) == QUESTIONS
    claims = rows(db, "SELECT * FROM claims WHERE scope = 'judge'")
    assert len(claims) == QUESTIONS and all(c["done"] for c in claims)


def _eval_argv(db, model):
    return [
        "eval", str(EXAMPLES / "questions.jsonl"), "--mode", "all", "--votes", "2",
        "--samples", str(QUESTIONS), "--seeds", "1", *SMALL, "--max-tokens", str(MAX_TOKENS),
        "--parallel", "2", "--model", str(model), "--db", str(db), "--json",
    ]  # fmt: skip


def test_two_evaluations_share_one_eval_run(tmp_path, small_model):
    db = tmp_path / "eval.db"
    procs = [_start(_eval_argv(db, small_model)) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outs]
    total = QUESTIONS * 2 * 3  # questions x votes x roles
    assert all(r["generations_total"] == total for r in results)
    assert sum(r["generations_new"] for r in results) == total
    assert results[0]["benchmarks"] == results[1]["benchmarks"]
    assert rows(db, "SELECT COUNT(*) c FROM eval_generations")[0]["c"] == total
    assert not rows(db, "SELECT * FROM claims WHERE scope = 'eval'")  # let go when done


def test_sigterm_stops_eval_and_the_same_command_continues(tmp_path, small_model):
    db = tmp_path / "eval.db"
    proc = _start(_eval_argv(db, small_model), preexec_fn=default_signals)
    deadline = time.monotonic() + 300
    while _count(db, "SELECT COUNT(*) c FROM eval_generations") < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "Terminated." and "Traceback" not in err
    sql = "SELECT id, output, created_at FROM eval_generations"
    kept = rows(db, sql)
    assert 2 <= len(kept) < QUESTIONS * 2 * 3
    r = subprocess.run(
        [sys.executable, "-m", "malt_local", *_eval_argv(db, small_model)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generations_new"] == QUESTIONS * 2 * 3 - len(kept)
    after = {g["id"]: g for g in rows(db, sql)}
    assert all(after[g["id"]] == g for g in kept)
