"""LoRA adapters through `--engine openai`: llama-server applies each request's `lora` field.

Against the scripted server (openaiserver.py): which adapter id each role's requests carry, the
explicit zeros a base request needs, the file matching, the refusals. Against the real
llama-server that `make llama-server` builds, serving the small model with random adapters
(tests/test_adapters.py writes them): each role's nodes are made with its own file, found by
file whatever the server's order, and a run without adapters is the base model even on a server
that would apply its adapters by default.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.engines.openai.lora import lora_field, match
from malt_local.errors import MaltError
from malt_local.hashing import cached_sha256
from malt_local.roles import tree_size
from tests.conftest import EXAMPLES
from tests.openaiserver import FakeOpenAI
from tests.test_adapters import model_shapes, write_lora
from tests.test_run_adapters import train_folder

GSM8K = EXAMPLES / "gsm8k.jsonl"  # 3 questions
NODES = 3 * tree_size(2)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, small_model) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("served_loras")
    shapes = model_shapes(small_model)
    return {
        "g": write_lora(d / "g.gguf", shapes, seed=2),
        "v": write_lora(d / "v.gguf", shapes, targets=("attn_k", "attn_output"), seed=3),
    }


def run(db, url, *extra, model="fake-model", questions=GSM8K, n=2, seed=None):
    argv = ["run", "--engine", "openai", "--endpoint", url, "--n", str(n),
            "--max-tokens", "16", "--db", str(db), "--json", *extra, str(questions)]  # fmt: skip
    if model:  # None: the one model the server lists
        argv[1:1] = ["--model", model]
    if seed is not None:
        argv[1:1] = ["--seed", str(seed), "--temperature", "0"]
    return CliRunner().invoke(cli, argv)


def one_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def pattern(body: dict) -> tuple | None:
    lora = body.get("lora")
    return None if lora is None else tuple((e["id"], e["scale"]) for e in lora)


# -- against the scripted server ---------------------------------------------------------------


def test_each_request_carries_its_roles_adapter_by_file_and_every_other_at_zero(tmp_path, loras):
    db = tmp_path / "malt.db"
    # The server lists v.gguf first, at a path readable here, and g.gguf at one that is not
    # (as when it runs on another machine): each is found by its file, not by position.
    served = (str(loras["v"]), "/elsewhere/adapters/g.gguf")
    adapters = ("--adapter", f"generator={loras['g']}", "--adapter", f"verifier={loras['v']}:0.5")
    with FakeOpenAI(slots=1, loras=served) as server:
        r = run(db, server.url, *adapters)
        assert r.exit_code == 0, r.output
        bodies = [c.body for c in server.chats]
    # One slot: one node a request. Generator 3 x 2, verifier 3 x 4, refiner 3 x 8.
    assert Counter(pattern(b) for b in bodies) == {
        ((0, 0.0), (1, 1.0)): 6,
        ((0, 0.5), (1, 0.0)): 12,
        ((0, 0.0), (1, 0.0)): 24,
    }
    summary = json.loads(r.stdout)
    assert summary["nodes_total"] == NODES
    assert summary["config"]["adapters"] == {
        "generator": [[cached_sha256(loras["g"]), 1.0]],
        "verifier": [[cached_sha256(loras["v"]), 0.5]],
    }
    # The adapters are the run's identity here too: others are refused, the same continue.
    with FakeOpenAI(slots=1, loras=served) as server:
        line = one_line(run(db, server.url, "--adapter", f"generator={loras['v']}"))
        assert "adapters" in line and "--new-run" in line, line
        r = run(db, server.url, *adapters)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["nodes_generated"] == 0 and not server.chats


def test_a_run_without_adapters_sends_zeros_to_a_server_that_lists_some(tmp_path, loras):
    """llama-server applies its --lora files at scale 1 to a request that does not say."""
    with FakeOpenAI(slots=2, loras=(str(loras["g"]),)) as server:
        assert run(tmp_path / "a.db", server.url).exit_code == 0
        assert {pattern(c.body) for c in server.chats} == {((0, 0.0),)}
    with FakeOpenAI(slots=2, loras=()) as server:  # a server with no adapters: no field
        assert run(tmp_path / "b.db", server.url).exit_code == 0
        assert {pattern(c.body) for c in server.chats} == {None}


def test_eval_sends_the_adapted_sets_stack_and_zeros_for_the_base_set(tmp_path, loras):
    db = tmp_path / "ev.db"
    with FakeOpenAI(slots=1, loras=(str(loras["g"]),)) as server:
        argv = ["eval", "--engine", "openai", "--endpoint", server.url, "--model", "fake-model",
                "--mode", "all", "--votes", "1", "--samples", "2", "--seeds", "1",
                "--max-tokens", "16", "--db", str(db), "--json",
                "--adapter", f"generator={loras['g']}", str(GSM8K)]  # fmt: skip
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 0, r.output
        # Two sampled questions, one turn per role each (--votes 1): the base set's 2 x 3 turns
        # and the adapted set's critiques and refinements at zero, its 2 generator turns with g.
        assert Counter(pattern(c.body) for c in server.chats) == {((0, 0.0),): 10, ((0, 1.0),): 2}


def test_served_adapter_refusals_are_one_line_and_write_nothing(tmp_path, loras, small_model):
    db = tmp_path / "malt.db"
    g = ("--adapter", f"generator={loras['g']}")
    with FakeOpenAI() as server:  # no /props, no /lora-adapters: not a llama-server
        assert "cannot apply LoRA adapters per request" in one_line(run(db, server.url, *g))
    with FakeOpenAI(slots=2, loras=(str(loras["v"]),)) as server:
        line = one_line(run(db, server.url, *g))
        assert "does not serve the LoRA g.gguf; it serves: v.gguf" in line, line
        assert f"--lora {loras['g']}" in line
        assert not server.chats
    with FakeOpenAI(slots=2) as server:
        line = one_line(run(db, server.url, "--adapter", f"generator={small_model}"))
        assert "is a model, not a LoRA adapter" in line
    # A train folder is checked against the served model's digest, which malt only knows
    # when told; the adapters' files are then found on the server as with --adapter.
    sha = cached_sha256(small_model)
    folder = train_folder(tmp_path, loras["v"], sha)
    with FakeOpenAI(slots=1, loras=(str(folder / "verifier-sft.gguf"),)) as server:
        line = one_line(run(db, server.url, "--adapters", str(folder)))
        assert "pass --model-sha256" in line and "--allow-mismatch" in line, line
        line = one_line(run(db, server.url, "--adapters", str(folder), "--model-sha256", "1" * 64))
        assert f"were trained on the model with sha256 {sha[:12]}" in line, line
        assert not db.exists() and not server.chats
        r = run(db, server.url, "--adapters", str(folder), "--model-sha256", sha)
        assert r.exit_code == 0, r.output
        assert Counter(pattern(c.body) for c in server.chats) == {((0, 1.0),): 12, ((0, 0.0),): 30}


def test_a_file_is_matched_by_name_and_by_contents_where_the_server_path_is_readable(tmp_path):
    local = tmp_path / "round2" / "verifier-sft.gguf"
    local.parent.mkdir()
    local.write_bytes(b"round 2")
    older = tmp_path / "round1" / "verifier-sft.gguf"
    older.parent.mkdir()
    older.write_bytes(b"round 1")
    url = "http://h"
    assert match(url, local, [(0, "a.gguf"), (1, "verifier-sft.gguf")]) == 1  # relative path
    # Both rounds served: the readable one with the same bytes is the file.
    assert match(url, local, [(0, str(older)), (1, str(local))]) == 1
    with pytest.raises(MaltError, match="a file of that name with other contents"):
        match(url, local, [(0, str(older))])
    with pytest.raises(MaltError, match="serves several LoRA files named verifier-sft.gguf"):
        match(url, local, [(0, "/x/verifier-sft.gguf"), (1, "/y/verifier-sft.gguf")])
    with pytest.raises(MaltError, match="cannot apply LoRA adapters per request"):
        match(url, local, None)
    assert lora_field(url, [], []) is None and lora_field(url, None, []) is None


# -- against the real llama-server -------------------------------------------------------------


QUESTIONS = [{"question": "What is 3 + 5?", "answer": "#### 8"}]


def node_texts(db: Path) -> dict[tuple[str, str], tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT question_id, path, role, output FROM nodes").fetchall()
    return {(q, p): (role, out) for q, p, role, out in rows}


def real_run(db, server, questions, *extra):
    # One request at a time: every request meets the same cache state on every server, so two
    # fresh servers give the same greedy texts (as in test_openai_real's reproducibility test).
    return run(db, server.url, "--max-in-flight", "1", *extra, model=None, questions=questions,
               seed=1)  # fmt: skip


def test_llama_server_applies_each_roles_own_file_and_the_base_gets_none(
    tmp_path, small_model, loras
):
    from malt_local.bench.llama_server import LlamaServer

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    both = ["--lora", str(loras["v"]), "--lora", str(loras["g"]), "--cache-ram", "0"]
    only_g = ["--lora", str(loras["g"]), "--cache-ram", "0"]  # applied to every request unless told
    g = ("--adapter", f"generator={loras['g']}")
    with LlamaServer(small_model, slots=1, extra=both) as s1:
        assert [a["path"] for a in s1.get("/lora-adapters")] == [str(loras["v"]), str(loras["g"])]
        r = real_run(tmp_path / "a.db", s1, questions, *g)
        assert r.exit_code == 0, r.output
    with LlamaServer(small_model, slots=1, extra=only_g) as s2:
        r = real_run(tmp_path / "c.db", s2, questions, *g)
        assert r.exit_code == 0, r.output
        r = real_run(tmp_path / "d.db", s2, questions)
        assert r.exit_code == 0, r.output
        line = one_line(real_run(tmp_path / "e.db", s2, questions, "--adapter",
                                 f"verifier={loras['v']}"))  # fmt: skip
        assert "does not serve the LoRA v.gguf" in line, line
    assert not (tmp_path / "e.db").exists()
    a, c, base = (node_texts(tmp_path / f"{x}.db") for x in "acd")
    assert len(a) == len(QUESTIONS) * tree_size(2) and set(a) == set(c) == set(base)
    # g.gguf is id 1 on the first server and id 0 on the second: the same file, the same tree.
    assert a == c
    # The run without adapters is the base model although s2 would apply g.gguf by default:
    # every generator node differs from the adapted ones.
    generators = [k for k, (role, _) in base.items() if role == "generator"]
    assert generators and all(base[k][1] != c[k][1] for k in generators), [
        (base[k][1], c[k][1]) for k in generators
    ]
