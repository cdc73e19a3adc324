"""`--engine openai` against a scripted OpenAI-compatible server on 127.0.0.1 (openaiserver.py):
the requests it sends, faults and retries, endpoints taken out, locality, resume, identity.

The same engine against a real server serving the small model is in test_openai_real.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.engines.openai.engine import MalformedAnswer, OpenAIEngine, parse_answer
from malt_local.engines.openai.routing import Endpoint, pick
from malt_local.engines.openai.settings import split_endpoints
from malt_local.questions.loading import load_questions
from tests.conftest import EXAMPLES, ROOT
from tests.openaiserver import FakeOpenAI, reply_text

GSM8K = EXAMPLES / "gsm8k.jsonl"  # 3 questions: 3 x 14 nodes at n = 2
NODES = 3 * 14


def run(db, *urls, extra=(), model="fake-model", questions=GSM8K, env=None):
    argv = ["run", "--engine", "openai", "--n", "2", "--max-tokens", "16", "--db", str(db),
            "--json", *extra, str(questions)]  # fmt: skip
    if model:
        argv[1:1] = ["--model", model]
    for url in urls:
        argv[1:1] = ["--endpoint", url]
    return CliRunner().invoke(cli, argv, env=env)


def nodes(db) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM nodes ORDER BY id")]
    finally:
        conn.close()


def assert_complete_tree(db, expected: int = NODES) -> list[dict]:
    rows = nodes(db)
    assert len(rows) == expected == len({r["id"] for r in rows})
    assert all(r["value"] is not None and r["label"] is not None for r in rows)
    return rows


# -- what goes over the wire -------------------------------------------------------------------


def test_each_node_is_one_request_with_every_sampling_value_and_its_own_seed(tmp_path):
    db = tmp_path / "m.db"
    with FakeOpenAI(api_key="sk-test") as server:
        r = run(db, server.url, extra=["--seed", "3", "--ignore-eos"],
                env={"OPENAI_API_KEY": "sk-test"})  # fmt: skip
        assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["nodes_generated"] == NODES and len(server.chats) == NODES
    rows = assert_complete_tree(db)
    by_seed = {c.body["seed"]: c for c in server.chats}
    for node in rows:
        chat = by_seed[node["seed"]]  # the stored seed is the one sent
        body = chat.body
        assert body["messages"] == json.loads(node["messages"])
        assert node["output"] == reply_text(body, 0)
        assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (
            0.3, 1.0, 0, 16)  # fmt: skip
        assert body["min_p"] == 0.0 and body["ignore_eos"] is True and "n" not in body
        assert body["model"] == "fake-model" and body["stream"] is False
        assert chat.session == node["question_id"]
        assert chat.authorization == "Bearer sk-test"
        assert node["prompt_tokens"] == 10
        assert node["completion_tokens"] == len(node["output"].split())
        assert node["finish_reason"] == "stop"
    config = json.loads(sqlite3.connect(db).execute("SELECT config FROM runs").fetchone()[0])
    assert config["engine"] == "openai" and config["served_model"] == "fake-model"
    assert result["config"]["model"] == "fake-model"
    assert result["config"]["model_sha256"] == "served:fake-model"


def test_server_n_sends_children_together_and_stores_the_seed_that_made_each(tmp_path):
    db = tmp_path / "n.db"
    # /props with total_slots: a llama-server, which gives child i the seed + i.
    with FakeOpenAI(slots=4) as server:
        r = run(db, server.url)
        assert r.exit_code == 0, r.stderr
    assert len(server.chats) == 3 * (1 + 2 + 4)  # one request per node with children
    assert all(c.body["n"] == 2 for c in server.chats)
    rows = assert_complete_tree(db)
    by_parent = defaultdict(list)
    for node in rows:
        by_parent[(node["question_id"], node["parent_id"])].append(node)
    for siblings in by_parent.values():
        first, second = sorted(siblings, key=lambda s: s["branch"])
        assert second["seed"] == first["seed"] + 1
        assert first["output"] != second["output"]
        for s in (first, second):
            assert f"seed {s['seed']}." in s["output"]
    # --no-server-n: one request per node, each with its own derived seed.
    with FakeOpenAI(slots=4) as server:
        r = run(tmp_path / "n1.db", server.url, extra=["--no-server-n"])
        assert r.exit_code == 0, r.stderr
    assert len(server.chats) == NODES and all("n" not in c.body for c in server.chats)


@pytest.mark.parametrize("json_schema_format", [True, False])
def test_judge_through_the_server_sends_the_schema(tmp_path, json_schema_format):
    db = tmp_path / "j.db"
    with FakeOpenAI(json_schema_format=json_schema_format) as server:
        r = run(db, server.url, extra=["--judge"])
        assert r.exit_code == 0, r.stderr
    judged = [c.body for c in server.chats if "response_format" in c.body]
    fields = ["explanation", "key_matches", "reasoning_score", "correctness_score"]
    if json_schema_format:
        assert len(judged) == 3 * 8
        fmt = judged[0]["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"] == fields
    else:
        # Refused (422; as many times as requests were in flight), then the older form with
        # the schema, once for every verdict.
        types = Counter(b["response_format"]["type"] for b in judged)
        assert types["json_object"] == 3 * 8 and 1 <= types["json_schema"] <= 8
        assert judged[-1]["response_format"]["schema"]["required"] == fields
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 384 for b in judged)
    assert json.loads(r.stdout)["judge"]["judged"] == 24


# -- faults --------------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(tmp_path):
    db = tmp_path / "r.db"
    with FakeOpenAI() as server:
        server.script = ["429"]
        r = run(db, server.url)
        assert r.exit_code == 0, r.stderr
    first = server.chats[0]
    again = [c for c in server.chats[1:] if c.body == first.body]
    assert len(again) == 1 and again[0].at - first.at >= 0.95
    assert len(server.chats) == NODES + 1
    assert_complete_tree(db)


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_503_and_a_connection_dropped_mid_response_are_retried(tmp_path, fault):
    db = tmp_path / "f.db"
    with FakeOpenAI() as server:
        server.script = [fault, None, fault]
        r = run(db, server.url)
        assert r.exit_code == 0, r.stderr
    assert len(server.chats) == NODES + 2
    rows = assert_complete_tree(db)
    sent = Counter(json.dumps(c.body, sort_keys=True) for c in server.chats)
    assert sorted(sent.values()).count(2) == 2  # two requests sent twice, the rest once
    assert {r["output"] for r in rows} <= {reply_text(c.body, 0) for c in server.chats}


def test_a_request_that_hangs_past_the_timeout_is_retried(tmp_path):
    db = tmp_path / "h.db"
    with FakeOpenAI(hang_seconds=20) as server:
        server.script = ["hang"]
        started = time.monotonic()
        r = run(db, server.url, extra=["--request-timeout", "1"])
        assert r.exit_code == 0, r.stderr
        assert time.monotonic() - started < 15  # it did not wait for the hung answer
    first = server.chats[0]
    assert [c.body for c in server.chats].count(first.body) == 2
    assert_complete_tree(db)


def test_an_endpoint_killed_mid_run_hands_its_questions_to_the_other(tmp_path):
    db = tmp_path / "k.db"
    questions = EXAMPLES / "questions.jsonl"
    ids = [q.id for q in load_questions(questions)]
    with FakeOpenAI(delay=0.02) as a, FakeOpenAI(delay=0.02) as b:
        eps = [Endpoint(a.url, 8, False), Endpoint(b.url, 8, False)]
        owners = Counter(pick(eps, q).url for q in ids)
        # The endpoint that owns more questions dies on its third request.
        dead, alive = (a, b) if owners[a.url] >= owners[b.url] else (b, a)
        dead.script = [None, None, "kill"]
        r = run(db, a.url, b.url, questions=questions)
        assert r.exit_code == 0, r.stderr
        assert dead.killed.is_set() and not alive.killed.is_set()
    assert f"endpoint {dead.url} taken out" in r.stderr
    stored = assert_complete_tree(db, len(ids) * 14)
    # Every node came from a request the survivor answered, but the dead one's first two.
    answered = {reply_text(c.body, 0) for c in alive.chats}
    assert sum(1 for s in stored if s["output"] not in answered) <= 2
    # The survivor got every question's remaining requests, its own and the dead one's.
    assert {c.session for c in alive.chats} == set(ids)


def test_a_questions_nodes_all_go_to_one_endpoint(tmp_path):
    db = tmp_path / "l.db"
    with FakeOpenAI() as a, FakeOpenAI() as b:
        r = run(db, a.url, b.url, questions=EXAMPLES / "questions.jsonl")
        assert r.exit_code == 0, r.stderr
    seen_a = {c.session for c in a.chats}
    seen_b = {c.session for c in b.chats}
    assert not seen_a & seen_b and len(seen_a | seen_b) == 6
    assert len(a.chats) + len(b.chats) == 6 * 14
    for server, sessions in ((a, seen_a), (b, seen_b)):
        assert Counter(c.session for c in server.chats) == {s: 14 for s in sessions}


def test_rendezvous_moves_only_the_questions_of_an_endpoint_taken_out():
    eps = [Endpoint(f"http://10.0.0.{i}:8000", 8, False) for i in range(1, 4)]
    keys = [f"q{i}" for i in range(300)]
    before = {k: pick(eps, k).url for k in keys}
    assert len(set(before.values())) == 3  # spread over all three
    eps[1].down = True
    after = {k: pick(eps, k).url for k in keys}
    for k in keys:
        if before[k] != eps[1].url:
            assert after[k] == before[k]
        else:
            assert after[k] != eps[1].url
    for e in eps:
        e.down = True
    assert pick(eps, "q1") is None


def test_kill_9_mid_run_then_resume_stores_every_node_once(tmp_path):
    db = tmp_path / "kill.db"
    with FakeOpenAI(delay=0.05) as server:
        argv = [sys.executable, "-m", "malt_local", "run", "--engine", "openai",
                "--endpoint", server.url, "--model", "fake-model", "--n", "2",
                "--max-tokens", "16", "--db", str(db), "--max-in-flight", "2",
                str(GSM8K)]  # fmt: skip
        env = {**os.environ, "MALT_HOME": str(tmp_path / "home")}
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if db.exists():
                try:
                    count = sqlite3.connect(db).execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
                except sqlite3.OperationalError:
                    count = 0
                if count >= 10:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stored = len(nodes(db))
        assert 10 <= stored < NODES
        sent_before = len(server.chats)
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        resumed = server.chats[sent_before:]
    assert_complete_tree(db)
    # The second run asked only for what was missing.
    assert len(resumed) == NODES - stored


# -- what a user can get wrong: one line, exit 2, nothing written ----------------------------------


def test_start_errors_are_one_line_and_write_nothing(tmp_path):
    db = tmp_path / "e.db"
    with FakeOpenAI(api_key="right") as server:
        r = run(db, server.url, env={"OPENAI_API_KEY": "wrong"})
        assert r.exit_code == 2
        assert r.stderr.strip() == (
            f"Error: endpoint {server.url} refused the API key (HTTP 401): set $OPENAI_API_KEY "
            "or name the variable that holds it with --api-key-env"
        )
        r = run(
            db,
            server.url,
            model="other",
            env={"MY_KEY": "right"},
            extra=["--api-key-env", "MY_KEY"],
        )
        assert r.exit_code == 2
        assert r.stderr.strip() == (
            f"Error: endpoint {server.url} does not serve model 'other' (it serves: fake-model)"
        )
        url = server.url
    r = run(db, url)
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: endpoint {url} is not reachable")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not db.exists()
    r = run(db, "ftp://x")
    assert r.exit_code == 2 and "not an http:// or https:// URL" in r.stderr
    r = CliRunner().invoke(cli, ["run", "--endpoint", "http://x", str(GSM8K)])
    assert r.exit_code == 2 and r.stderr.strip() == "Error: --endpoint needs --engine openai"


def test_endpoints_from_the_environment():
    assert split_endpoints((), "http://a:1/v1, http://b:2 http://a:1") == (
        "http://a:1", "http://b:2")  # fmt: skip
    assert split_endpoints(("http://c:3/",), "http://a:1") == ("http://c:3",)


def test_continuing_against_another_served_model_is_refused(tmp_path):
    db = tmp_path / "i.db"
    with FakeOpenAI(models=("fake-model", "other-model")) as server:
        r = run(db, server.url, extra=["--model-revision", "abc123"])
        assert r.exit_code == 0, r.stderr
        r = run(db, server.url, model="other-model", extra=["--model-revision", "abc123"])
        assert r.exit_code == 2
        assert "was made with model fake-model@abc123 (now other-model@abc123)" in r.stderr
        # The same model and revision continues (nothing left to do).
        r = run(db, server.url, extra=["--model-revision", "abc123"])
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["nodes_generated"] == 0
    assert len(nodes(db)) == NODES


def test_eval_runs_through_the_server(tmp_path):
    db = tmp_path / "ev.db"
    with FakeOpenAI() as server:
        argv = ["eval", "--engine", "openai", "--endpoint", server.url, "--model", "fake-model",
                "--mode", "all", "--votes", "1", "--samples", "2", "--seeds", "1",
                "--max-tokens", "16", "--role-model", "verifier=fake-model", "--db", str(db),
                "--json", str(GSM8K)]  # fmt: skip
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    # SA: 2 generator turns; MA adds a critique and a refinement to each.
    assert result["generations_total"] == 6 == len(server.chats)
    assert {c.body["model"] for c in server.chats} == {"fake-model"}
    assert all(c.session for c in server.chats)
    r = CliRunner().invoke(cli, [*argv[:-1], "--parallel", "4", str(GSM8K)])
    assert r.exit_code == 2
    assert "--parallel is for the llama.cpp engines" in r.stderr


def test_a_lone_endpoint_rides_out_a_burst_of_errors(tmp_path):
    # More failures in a row than take an endpoint out when there are others to go to.
    db = tmp_path / "b.db"
    with FakeOpenAI() as server:
        server.script = ["503"] * 5
        r = run(db, server.url)
        assert r.exit_code == 0, r.stderr
    assert "taken out" not in r.stderr
    assert len(server.chats) == NODES + 5
    assert_complete_tree(db)


def test_role_model_sends_one_roles_requests_to_another_served_name(tmp_path):
    db = tmp_path / "rm.db"
    with FakeOpenAI(models=("fake-model", "critic")) as server:
        r = run(db, server.url, extra=["--role-model", "verifier=critic"])
        assert r.exit_code == 0, r.stderr
        r2 = run(tmp_path / "x.db", server.url, extra=["--role-model", "refiner=nobody"])
        assert r2.exit_code == 2
        assert r2.stderr.strip() == (
            f"Error: endpoint {server.url} does not serve the refiner's model 'nobody' "
            "(it serves: fake-model, critic)"
        )
        r3 = run(tmp_path / "y.db", server.url, extra=["--role-model", "critic"])
        assert r3.exit_code == 2 and "expected ROLE=NAME" in r3.stderr
    seeds = {n["seed"]: n["role"] for n in nodes(db)}
    models = Counter((seeds[c.body["seed"]], c.body["model"]) for c in server.chats)
    assert models == {("generator", "fake-model"): 6, ("verifier", "critic"): 12,
                      ("refiner", "fake-model"): 24}  # fmt: skip
    assert json.loads(r.stdout)["config"]["role_models"] == {"verifier": "critic"}
    # Other served names for a role are other weights: continuing without them is refused.
    with FakeOpenAI(models=("fake-model", "critic")) as server:
        r = run(db, server.url)
    assert r.exit_code == 2 and "role_models" in r.stderr


# -- answers of the wrong shape: a server error, retried, never a traceback ----------------------


def _answer(choices: object = None, usage: object = None, **fields) -> bytes:
    if choices is None:
        choices = [{"index": 0, "message": {"role": "assistant", "content": "Final Answer: 1"},
                    "finish_reason": "stop"}]  # fmt: skip
    data = {"choices": choices, **fields}
    if usage is not None:
        data["usage"] = usage
    return json.dumps(data).encode()


MALFORMED = {
    "not JSON": b"<html>502 Bad Gateway</html>",
    "not UTF-8": b'{"choices": "\xff\xfe"}',
    "a list": b"[1, 2]",
    "a string": b'"hello"',
    "choices a string": _answer(choices="Final Answer: 1"),
    "choices of strings": _answer(choices=["Final Answer: 1"]),
    "no choices": _answer(choices=[]),
    "message a string": _answer(choices=[{"index": 0, "message": "Final Answer: 1"}]),
    "no message": _answer(choices=[{"index": 0, "finish_reason": "stop"}]),
    "content missing": _answer(choices=[{"index": 0, "message": {"role": "assistant"}}]),
    "content none": _answer(choices=[{"index": 0, "message": {"content": None}}]),
    "content a number": _answer(choices=[{"index": 0, "message": {"content": 7}}]),
    "index a string": _answer(choices=[{"index": "0", "message": {"content": "x"}}]),
    "usage a list": _answer(usage=[1]),
    "usage Infinity": b'{"choices": [{"message": {"content": "x"}}], '
    b'"usage": {"prompt_tokens": Infinity, "completion_tokens": 3}}',
    "usage NaN": b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": NaN}}',
    "usage negative": _answer(usage={"prompt_tokens": 10, "completion_tokens": -1}),
    "usage a float": _answer(usage={"prompt_tokens": 10.5, "completion_tokens": 1}),
    "usage a string": _answer(usage={"prompt_tokens": "10", "completion_tokens": 1}),
    "usage a bool": _answer(usage={"prompt_tokens": True, "completion_tokens": 1}),
    "usage huge": _answer(usage={"prompt_tokens": 2**53, "completion_tokens": 1}),
    "usage of 5000 digits": b'{"choices": [{"message": {"content": "x"}}], '
    b'"usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}",
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_an_answer_of_the_wrong_shape_is_malformed_never_a_traceback(body):
    with pytest.raises(MalformedAnswer):
        parse_answer(body)


def test_a_well_formed_answer_is_read():
    choices, prompt, completion = parse_answer(
        _answer(usage={"prompt_tokens": 2**53 - 1, "completion_tokens": 0})
    )
    assert choices[0]["message"]["content"] == "Final Answer: 1"
    assert (prompt, completion) == (2**53 - 1, 0)
    # Usage absent or null counts nothing, as before.
    assert parse_answer(_answer())[1:] == (0, 0)
    assert parse_answer(b'{"choices": [{"message": {"content": ""}}], "usage": null}')[1:] == (
        0, 0)  # fmt: skip


def test_a_malformed_answer_is_retried_as_a_server_error(tmp_path):
    db = tmp_path / "w.db"
    with FakeOpenAI() as server:
        server.script = [MALFORMED["choices of strings"], None, MALFORMED["usage Infinity"]]
        r = run(db, server.url)
        assert r.exit_code == 0, r.stderr
    assert len(server.chats) == NODES + 2
    rows = assert_complete_tree(db)
    # Nothing of the malformed answers was stored: every node is a normal answer.
    assert {r["output"] for r in rows} <= {reply_text(c.body, 0) for c in server.chats}
    assert all(0 <= r["prompt_tokens"] < 2**53 for r in rows)


def test_a_server_that_keeps_answering_malformed_ends_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(OpenAIEngine, "_delay", lambda self, attempt, retry_after: 0.0)
    db = tmp_path / "m.db"
    with FakeOpenAI() as server:
        server.script = [MALFORMED["message a string"]] * 1000
        r = run(db, server.url)
    assert r.exit_code == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: every endpoint failed ({server.url}: unreadable answer")
    assert line.endswith("what was stored is kept: re-run to continue")
    assert "Traceback" not in r.stderr


def test_a_lone_surrogate_in_the_text_is_stored_as_the_replacement_character(tmp_path):
    db = tmp_path / "s.db"
    with FakeOpenAI() as server:
        server.script = [b'{"choices": [{"index": 0, "message": {"content": '
                         b'"Working \\ud800 it out. Final Answer: 1"}}]}']  # fmt: skip
        r = run(db, server.url)
        assert r.exit_code == 0, r.stderr
    outputs = [n["output"] for n in assert_complete_tree(db)]
    assert "Working \ufffd it out. Final Answer: 1" in outputs


class _Trickle:
    """A server that answers every connection with one byte at a time, a byte every 0.5 s:
    each read finishes well within any socket timeout, the answer never does."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 100:
                if self.stop.wait(0.5):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_the_start_up_probe_is_bounded_by_the_request_timeout_as_a_whole(tmp_path):
    db = tmp_path / "t.db"
    server = _Trickle()
    try:
        url = f"http://malt:hunter2@127.0.0.1:{server.port}"
        started = time.monotonic()
        r = run(db, url, extra=["--request-timeout", "1"])
        took = time.monotonic() - started
    finally:
        server.close()
    assert r.exit_code == 2, r.stderr
    assert took < 10  # the trickle never ends: unbounded, this would hang
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    # The URL's credentials go as Basic auth, and the URL is named without them.
    assert lines[0].startswith(f"Error: endpoint http://127.0.0.1:{server.port} ")
    assert "within 1 s" in lines[0] and "hunter2" not in lines[0]
    assert not db.exists()
