"""Tree, credit and storage logic against a scripted engine (no model)."""

import json

import pytest

from malt_local.db.store import Store
from malt_local.prompts import PromptSet
from malt_local.questions.loading import load_questions
from malt_local.roles import tree_size
from malt_local.run.settings import Run, RunSpec
from malt_local.run.tree import TreeRunner, derive_seed
from tests.conftest import EXAMPLES
from tests.fakes import FakeEngine


def script(request, key, seed):
    """Refiner leaves answer right when their last branch index is 0, wrong otherwise."""
    path = key.rsplit("/", 1)[1]
    if path.count(".") == 2:
        return "Final Answer: 18" if path.endswith(".0") else "Final Answer: 17"
    return f"step {path}\nFinal Answer: 18"


def make_run(store, n=2, theta=0.5):
    spec = RunSpec(
        model="fake.gguf",
        model_sha256="0" * 64,
        n=n,
        temperature=0.3,
        top_p=1.0,
        top_k=0,
        max_tokens=16,
        seed=7,
        theta=theta,
        task=None,
        prompts_sha256="p",
        prompt_hashes={},
    )
    store.insert_run(spec.row("rtest"))
    return store.run("rtest")


@pytest.fixture
def setup(tmp_path):
    store = Store(tmp_path / "t.db")
    questions = load_questions(EXAMPLES / "gsm8k.jsonl")[:2]
    for q in questions:
        object.__setattr__(q, "ground_truth", "18")
    run = make_run(store)
    store.add_questions(run["id"], questions)
    return store, run, questions


def test_full_tree_counts_links_values(setup):
    store, run, questions = setup
    engine = FakeEngine(script)
    progress = TreeRunner(store, Run.from_row(run), questions, engine, PromptSet()).execute()
    assert progress.done == progress.total == 2 * tree_size(2)
    nodes = list(store.nodes("rtest"))
    assert len(nodes) == 28
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        if n.depth == 1:
            assert n.parent_id is None
        else:
            parent = by_id[n.parent_id]
            assert parent.depth == n.depth - 1 and n.path.startswith(parent.path + ".")
    # Leaves ending in .0 are right: every verifier has value 1/2, every generator 1/2.
    for n in nodes:
        if n.role == "refiner":
            assert n.reward == (1.0 if n.path.endswith(".0") else 0.0) == n.value
            assert n.label == int(n.reward > 0.5)
        else:
            assert n.value == 0.5 and n.label == 0 and n.reward is None


def test_requests_share_prompts_and_extend_parents(setup):
    store, run, questions = setup
    engine = FakeEngine(script)
    TreeRunner(store, Run.from_row(run), questions, engine, PromptSet()).execute()
    # One request per parent: 1 root + 2 generators + 4 verifiers per question, n keys each.
    assert len(engine.requests) == 2 * 7
    assert all(len(r.keys) == 2 for r in engine.requests)
    node = next(n for n in store.nodes("rtest") if n.role == "refiner")
    msgs = json.loads(node.messages)
    gen = next(n for n in store.nodes("rtest") if n.id == node.parent_id.rsplit(".", 1)[0])
    assert msgs[2] == {"role": "assistant", "content": gen.output}
    # Every node's seed is the one derived from the run seed and its own place in the tree.
    nodes = list(store.nodes("rtest"))
    assert all(n.seed == derive_seed(7, n.question_id, n.branches) for n in nodes)
    assert len({n.seed for n in nodes}) == len(nodes)


def test_seeds_differ_per_node_and_are_stable():
    a = derive_seed(0, "q1", (0, 1, 2))
    assert a == derive_seed(0, "q1", (0, 1, 2))
    assert len({derive_seed(0, "q1", (0, 1, k)) for k in range(3)}) == 3
    assert a != derive_seed(1, "q1", (0, 1, 2))


def test_interrupted_run_resumes_without_regenerating(setup):
    store, run, questions = setup
    first = FakeEngine(script, fail_after=11)
    with pytest.raises(KeyboardInterrupt):
        TreeRunner(store, Run.from_row(run), questions, first, PromptSet()).execute()
    kept = {n.id: (n.output, n.created_at) for n in store.nodes("rtest")}
    assert len(kept) == 11
    second = FakeEngine(script)
    TreeRunner(store, Run.from_row(run), questions, second, PromptSet()).execute()
    assert not set(second.completed) & set(kept)
    nodes = {n.id: n for n in store.nodes("rtest")}
    assert len(nodes) == 28
    assert all((nodes[i].output, nodes[i].created_at) == v for i, v in kept.items())
    assert all(n.value is not None for n in nodes.values())


def test_a_stored_node_cannot_be_written_twice(setup):
    import sqlite3

    store, run, questions = setup
    TreeRunner(store, Run.from_row(run), questions, FakeEngine(script), PromptSet()).execute()
    node = next(store.nodes("rtest"))
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_node(node)


def test_parent_must_exist(setup):
    import sqlite3

    store, run, questions = setup
    TreeRunner(store, Run.from_row(run), questions, FakeEngine(script), PromptSet()).execute()
    node = next(n for n in store.nodes("rtest") if n.depth == 2)
    node.id, node.parent_id = node.id + "x", "rtest/nope/0"
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_node(node)
