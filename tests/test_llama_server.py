"""`--engine openai` against a real server: llama.cpp's own llama-server (built by `make
llama-server` from the llama-cpp-python sdist, so the same llama.cpp as the embedded engine)
serving the small model on 127.0.0.1 with four parallel slots.

The tree through the server is checked against the embedded engine's tree for the same
questions: same shape and bookkeeping, and at temperature 0 the same text in every node. With
sampling, the server gets a node's children as one request with `n` (it samples child i with
seed + i); the seeds malt stores must then reproduce every text on their own.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from malt_local.run.judge import PASS_THRESHOLD, SCORES
from tests.conftest import EXAMPLES, malt, run_argv
from tests.test_run_e2e import rows

N = 2
MAX_TOKENS = 24
LIMIT = 2
# Every column of a node that follows from the tree and the model, not from when it ran.
SAME = ("question_id", "role", "depth", "branch", "path", "messages", "output", "finish_reason",
        "answer", "correct", "reward", "value", "label", "prompt_tokens",
        "completion_tokens")  # fmt: skip


def by_place(db) -> dict[tuple[str, str], dict]:
    """Nodes by (question, path): the key that is the same in two databases."""
    nodes = rows(db, "SELECT * FROM nodes")
    ids = {n["id"]: n for n in nodes}
    out = {}
    for n in nodes:
        parent = ids[n["parent_id"]]["path"] if n["parent_id"] else None
        out[(n["question_id"], n["path"])] = {**n, "parent_path": parent}
    return out


def served(server, *extra: str) -> list[str]:
    return ["--engine", "openai", "--endpoint", server.url, *extra]


@pytest.fixture(scope="module")
def greedy_trees(tmp_path_factory, small_model, llama_server):
    """The same n = 2 tree at temperature 0 from the embedded engine and through the server."""
    d = tmp_path_factory.mktemp("greedy")
    env = {"MALT_HOME": str(d / "home")}
    common = ("--seed", "1", "--temperature", "0", "--json")
    local, remote = d / "local.db", d / "server.db"
    # Like with like: the embedded engine under the server's layout (four sequences of 2,048).
    pinned = ("--parallel", "4", "--ctx", "2048")
    r = malt(*run_argv(local, small_model, *common, *pinned, n=N, max_tokens=MAX_TOKENS,
                       limit=LIMIT), env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    argv = run_argv(remote, small_model, *common, n=N, max_tokens=MAX_TOKENS, limit=LIMIT)
    at = argv.index("--model")
    del argv[at : at + 2]  # the server's one model is the run's model
    r = malt(*argv, *served(llama_server), env=env)
    assert r.returncode == 0, r.stderr
    return local, remote, json.loads(r.stdout)


def test_server_tree_has_the_local_engines_shape_and_bookkeeping(greedy_trees, llama_server):
    local, remote, result = greedy_trees
    a, b = by_place(local), by_place(remote)
    assert set(a) == set(b) and len(b) == LIMIT * (N + N**2 + N**3)
    (run,) = rows(remote, "SELECT * FROM runs")
    assert run["id"] == result["run_id"]
    # The run records what the server serves (its /v1/models id), not a local file.
    (model,) = [m["id"] for m in llama_server.get("/v1/models")["data"]]
    assert run["model"] == model and run["model_sha256"] == f"served:{model}"
    for key, node in b.items():
        assert node["run_id"] == run["id"]
        assert node["parent_path"] == a[key]["parent_path"]
        assert node["prompt_tokens"] > 0 and 0 < node["completion_tokens"] <= MAX_TOKENS
        assert node["finish_reason"] in ("stop", "length")
        if node["role"] == "refiner":
            assert node["reward"] == float(node["correct"]) and node["value"] == node["reward"]
        assert node["label"] == int(node["value"] > run["theta"])
    # Credit: every inner node's value is the mean of its children's.
    children = defaultdict(list)
    for node in b.values():
        children[(node["question_id"], node["parent_path"])].append(node)
    for (qid, path), node in b.items():
        if node["role"] != "refiner":
            kids = children[(qid, path)]
            assert len(kids) == N
            assert node["value"] == pytest.approx(sum(k["value"] for k in kids) / N)
    # Ids follow from the tree: the same place gets the same id in a re-run of the same run.
    r = malt(*["run", "--db", str(remote), "--json"], *served(llama_server),
             str(EXAMPLES / "questions.jsonl"), "--limit", str(LIMIT),
             env={"MALT_HOME": str(remote.parent / "home")})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nodes_generated"] == 0
    assert {n["id"] for n in by_place(remote).values()} == {n["id"] for n in b.values()}


def test_server_tree_at_temperature_0_equals_the_local_engines_text(greedy_trees):
    """The server is sent exactly the local engine's prompts; the generators' greedy texts are
    the same. Deeper, a greedy text may differ where two tokens are nearly tied: llama-server
    decodes its slots' sequences in other batches than the engine does, batched sums round
    differently, and how often that flips a token depends on the CPU's kernels (on an AVX2 EPYC
    once in four runs, at one verifier; on an AVX-512 EPYC 18 of 28 texts, and the embedded
    engine alone agrees with itself on 16 of 28 between `--parallel 4` and its default). So the
    local tree is made under the server's layout (four sequences of 2,048 cells), and what is
    compared is what follows from the prompts, not how often a near-tie falls the same way:
    where the texts above a node are equal its prompt is too, and the server counts the same
    prompt in the same number of tokens (it renders the GGUF's template as malt does)."""
    local, remote, _ = greedy_trees
    a, b = by_place(local), by_place(remote)
    # A node's own columns: its value and label follow from descendants that may differ.
    own = [c for c in SAME if c not in ("completion_tokens", "reward", "value", "label")]
    for key in a:  # a prompt may differ only below a text that differed
        if a[key]["messages"] != b[key]["messages"]:
            assert a[key]["depth"] > 1, key
            parent = (key[0], a[key]["parent_path"])
            assert a[parent]["output"] != b[parent]["output"], key
        else:
            assert a[key]["prompt_tokens"] == b[key]["prompt_tokens"], key
    generators = [k for k in a if a[k]["depth"] == 1]
    different = [k for k in generators if any(a[k][c] != b[k][c] for c in own)]
    assert not different, [(k, {c: (a[k][c], b[k][c]) for c in own if a[k][c] != b[k][c]})
                           for k in different[:2]]  # fmt: skip
    # The first child of every node has the seed the local engine gave it; greedy decoding
    # makes the seeds irrelevant to the text, so this is bookkeeping, not sampling.
    for key, node in b.items():
        if node["branch"] == 0:
            assert node["seed"] == a[key]["seed"]


def test_each_node_books_its_own_completion_tokens_when_children_go_with_n(
    greedy_trees, small_model
):
    # llama-server answers a request with n choices with the *first* child's usage only
    # (tools/server/server-context.cpp merges the choices and keeps arr[0]'s usage), so the
    # usage cannot be split into per-child shares; each choice's own token count is needed
    # (e.g. `logprobs`: one entry per generated token).
    local, remote, _ = greedy_trees
    a, b = by_place(local), by_place(remote)
    # Each count is its own text's: a length-stopped node made exactly --max-tokens, and a
    # stopped one at least as many tokens as its text re-tokenizes to (a sampled text may be
    # spelled in more tokens than the tokenizer's own) and no more than the limit. A first
    # child's usage given to its siblings, or one request's usage shared among its n choices,
    # breaks one of these wherever the texts differ in length.
    from llama_cpp import Llama

    vocab = Llama(str(small_model), vocab_only=True, verbose=False)
    for key, node in b.items():
        made = node["completion_tokens"]
        if node["finish_reason"] == "length":
            assert made == MAX_TOKENS, key
        else:
            spelled = len(vocab.tokenize(node["output"].encode(), add_bos=False, special=False))
            assert spelled <= made <= MAX_TOKENS, (key, spelled, made, node["output"])
    # Where the greedy texts agree (see above for where they need not), so do the counts.
    agree = [k for k in a if a[k]["output"] == b[k]["output"]]
    assert agree  # the generators, at least
    wrong = {k: (a[k]["completion_tokens"], b[k]["completion_tokens"]) for k in agree
             if a[k]["completion_tokens"] != b[k]["completion_tokens"]}  # fmt: skip
    assert not wrong, list(wrong.items())[:4]


def test_children_go_with_n_and_record_the_seed_each_was_made_with(
    tmp_path, small_model, llama_server
):
    from malt_local.engines import EngineOptions, make_engine
    from malt_local.engines.openai.settings import OpenAISettings

    # The engine reads the server's four slots from /props and knows it samples n with seed + i.
    options = EngineOptions(
        max_tokens=MAX_TOKENS,
        remote=OpenAISettings(endpoints=(llama_server.url,), model="m"),
    )
    engine = make_engine("openai", options)
    try:
        (ep,) = engine.endpoints
        assert ep.slots == 4 and ep.server_n
    finally:
        engine.close()

    db = tmp_path / "sampled.db"
    argv = [*run_argv(db, small_model, "--seed", "3", "--temperature", "0.8", n=N,
                      max_tokens=MAX_TOKENS, limit=1), *served(llama_server)]  # fmt: skip
    at = argv.index("--model")
    del argv[at : at + 2]
    before = llama_server.metrics()
    r = malt(*argv, env={"MALT_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    after = llama_server.metrics()
    nodes = rows(db, "SELECT * FROM nodes ORDER BY question_id, path")
    assert len(nodes) == N + N**2 + N**3
    # Sampling made distinct siblings with distinct seeds.
    siblings = defaultdict(list)
    for n in nodes:
        siblings[n["parent_id"]].append(n)
    for group in siblings.values():
        assert len({n["seed"] for n in group}) == N
    assert any(len({n["output"] for n in group}) == N for group in siblings.values())
    # One request per node that has children (1 + N + N²), each with n = N: the server
    # processed each of those prompts once, so it read fewer prompts than it made outputs.
    # The server also counts the end-of-turn token of each output that stopped; malt books the
    # output's own tokens, as the local engines do.
    tokens = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    stopped = sum(n["finish_reason"] == "stop" for n in nodes)
    assert tokens == sum(n["completion_tokens"] for n in nodes) + stopped
    # Each child records the seed that made it: its parent's request went with the first
    # child's seed and n, and llama-server gives child i seed + i. (Sending the request again
    # need not give the same texts: with the prompt now cached, or alone with n = 1, the server
    # decodes in other batches, whose sums round differently.)
    for group in siblings.values():
        seeds = sorted(n["seed"] for n in group)
        assert seeds == [seeds[0] + i for i in range(N)]


def test_judge_through_the_server_gives_schema_valid_verdicts(tmp_path, llama_server):
    db = tmp_path / "judge.db"
    r = malt("run", "--task", "judge", "--n", "2", "--max-tokens", "16", "--limit", "1",
             "--db", str(db), "--json", *served(llama_server), str(EXAMPLES / "capitals.txt"),
             env={"MALT_HOME": str(tmp_path / "home")})  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["judge"]["judged"] == 8 and result["judge"]["sets_rewards"]
    judgements = rows(db, "SELECT * FROM judgements")
    leaves = {n["id"]: n for n in rows(db, "SELECT * FROM nodes WHERE depth = 3")}
    assert set(leaves) == {j["node_id"] for j in judgements}
    for j in judgements:
        # response_format held the server to the schema: the raw reply is the verdict.
        assert j["valid"] == 1, j["output"]
        reply = json.loads(j["output"], strict=False)
        assert list(reply) == ["explanation", "key_matches", "reasoning_score",
                               "correctness_score"]  # fmt: skip
        assert reply["correctness_score"] in SCORES and reply["reasoning_score"] in SCORES
        assert 1 <= len(reply["explanation"]) <= 300 and len(reply["key_matches"]) <= 5
        assert all(1 <= len(m) <= 60 for m in reply["key_matches"])
        assert j["correctness_score"] == reply["correctness_score"]
        expected = 1.0 if j["correctness_score"] >= PASS_THRESHOLD else 0.0
        assert leaves[j["node_id"]]["reward"] == expected


def test_malt_eval_runs_through_the_server(tmp_path, llama_server):
    db = tmp_path / "eval.db"
    r = malt("eval", str(EXAMPLES / "gsm8k.jsonl"), "--mode", "all", "--votes", "2",
             "--samples", "2", "--seeds", "1", "--max-tokens", "16", "--db", str(db), "--json",
             *served(llama_server), env={"MALT_HOME": str(tmp_path / "home")})  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["columns"] == ["SA", "SA+MV", "MA", "MA+MV"]
    # Two questions, two votes, three roles.
    assert out["generations_new"] == out["generations_total"] == 2 * 2 * 3
    gens = rows(db, "SELECT * FROM eval_generations")
    assert len(gens) == 12
    assert all(g["output"] and g["prompt_tokens"] > 0 for g in gens)
