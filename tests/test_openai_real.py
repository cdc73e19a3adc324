"""`--engine openai` against a real OpenAI-compatible server serving the small model:
llama-cpp-python's own server (`python -m llama_cpp.server`, from the test extra), on 127.0.0.1.

It honours seeds, sampling values, a JSON schema (as `json_object` + `schema`) and usage; it
ignores `n` and serves one request at a time, so it shows correctness, not throughput.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from malt_local.run.judge import JUDGE_SCHEMA, SCORES
from tests.conftest import EXAMPLES, malt

SERVED = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def python_server(model: Path, log: Path) -> Iterator[str]:
    """One llama_cpp.server serving `model` as SERVED; yields its URL and stops it after."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--model_alias", SERVED, "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "4096", "--n_threads", "1", "--n_threads_batch", "1",
            "--verbose", "False"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def llama_server(small_model, tmp_path_factory):
    with python_server(small_model, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


def rows(db: Path, sql: str) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_tree_through_the_server_has_the_local_engines_shape_and_bookkeeping(
    tmp_path, small_model, llama_server
):
    common = ["--n", "2", "--max-tokens", "24", "--limit", "1", "--seed", "4", "--json"]
    served_db, local_db = tmp_path / "served.db", tmp_path / "local.db"
    env = {"MALT_HOME": str(tmp_path / "home")}
    r = malt("run", "--engine", "openai", "--endpoint", llama_server, "--model", SERVED,
             "--db", str(served_db), *common, str(EXAMPLES / "gsm8k.jsonl"), env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    served = json.loads(r.stdout)
    # One thread each, as the server: on a busy 2-core machine spinning threads crawl.
    r = malt("run", "--engine", "simple", "--model", str(small_model), "--db", str(local_db),
             "--threads", "1", *common, str(EXAMPLES / "gsm8k.jsonl"), env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    local = json.loads(r.stdout)
    assert served["nodes_generated"] == local["nodes_generated"] == 14
    assert served["config"]["model"] == SERVED and served["config"]["engine"] == "openai"
    sql = "SELECT * FROM nodes ORDER BY path"
    a, b = rows(served_db, sql), rows(local_db, sql)
    strip = lambda node: node["id"].split("/", 1)[1]  # noqa: E731 - run ids differ
    assert [strip(x) for x in a] == [strip(x) for x in b]
    for x, y in zip(a, b, strict=True):
        for column in ("role", "depth", "branch", "path", "seed"):
            assert x[column] == y[column], column
        if x["depth"] == 1:
            assert x["messages"] == y["messages"]  # the same prompt went to both
        assert x["prompt_tokens"] > 0 and x["completion_tokens"] > 0
        assert x["completion_tokens"] <= 24 and x["finish_reason"] in ("stop", "length")
        assert x["value"] is not None and x["label"] is not None
        if x["depth"] == 3:
            assert x["reward"] in (0.0, 1.0)
    # The generators' prompt was read as the same number of tokens by the server.
    assert a[0]["prompt_tokens"] == b[0]["prompt_tokens"]
    # Sampling is explicit and seeded: the same command on a fresh database gives the same tree.
    # Compared like with like: each run on a fresh server. The shared one keeps the KV state
    # of earlier requests and reuses their prefixes, and llama.cpp's numerics follow what is
    # reused, so texts on it depend on which tests ran before (seen in a fresh-clone CI run).
    outputs = []
    for i in range(2):
        with python_server(small_model, tmp_path / f"fresh-{i}.log") as url:
            db = tmp_path / f"again-{i}.db"
            # One request at a time, so both servers see the same requests in the same order
            # (with several in flight the order follows timing, and so does prefix reuse).
            r = malt("run", "--engine", "openai", "--endpoint", url, "--model", SERVED,
                     "--max-in-flight", "1", "--db", str(db), *common,
                     str(EXAMPLES / "gsm8k.jsonl"), env=env)  # fmt: skip
            assert r.returncode == 0, r.stderr
            outputs.append([x["output"] for x in rows(db, sql)])
    assert len(outputs[0]) == 14 and outputs[0] == outputs[1]


def test_judge_through_the_server_gives_schema_valid_verdicts(tmp_path, llama_server):
    db = tmp_path / "judge.db"
    # n = 1 and two questions: two verdicts (each up to 384 tokens) keep the test short.
    r = malt("run", "--engine", "openai", "--endpoint", llama_server, "--task", "judge",
             "--n", "1", "--max-tokens", "16", "--limit", "2", "--db", str(db), "--json",
             str(EXAMPLES / "capitals.txt"), env={"MALT_HOME": str(tmp_path / "home")})  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["judge"]["judged"] == 2 and result["judge"]["model"] == SERVED
    assert result["judge"]["credited"] == 2
    judgements = rows(db, "SELECT * FROM judgements")
    assert len(judgements) == 2
    for j in judgements:
        assert j["valid"] == 1, j["output"]
        reply = json.loads(j["output"], strict=False)
        assert set(reply) == set(JUDGE_SCHEMA["required"])
        assert reply["correctness_score"] in SCORES and reply["reasoning_score"] in SCORES
        assert j["model"] == SERVED and j["model_sha256"] == "served:" + SERVED
    leaves = rows(db, "SELECT * FROM nodes WHERE depth = 3")
    assert len(leaves) == 2 and all(leaf["reward"] in (0.0, 1.0) for leaf in leaves)
