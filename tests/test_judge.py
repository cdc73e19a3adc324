"""The LLM judge: schema, parsing, the judge pass (rewards for `--task judge`, resumable), its
export, and the mechanics end to end with the real small model (not its wisdom)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from malt_local.db.store import Store
from malt_local.engines.base import Completion
from malt_local.errors import MaltError
from malt_local.export.options import ExportOptions
from malt_local.export.pipeline import export
from malt_local.prompts import PromptSet
from malt_local.questions.loading import Question
from malt_local.run import credit
from malt_local.run.judge import (
    JUDGE_PARAMS,
    JUDGE_SCHEMA,
    PASS_THRESHOLD,
    SCORES,
    JudgeModel,
    JudgePrompt,
    judge_run,
    parse_judgement,
)
from malt_local.run.settings import Run
from malt_local.run.tree import TreeRunner
from tests.conftest import EXAMPLES, malt
from tests.fakes import FakeEngine
from tests.test_export import make_run

FRANCE = Question("What is the capital of France?", "Paris", "judge")
# The fake judge's correctness per leaf (n = 2): 0.5 passes (>=), 0.4 does not.
VERDICTS = {"0.0.0": 1.0, "0.0.1": 0.5, "0.1.0": 0.4, "0.1.1": 0.0,
            "1.0.0": 0.9, "1.0.1": 0.1, "1.1.0": 0.0, "1.1.1": 0.0}  # fmt: skip


def leaf_script(request, key, seed):
    path = key.rsplit("/", 1)[1]
    return f"I think it is Paris (leaf {path}).\nFinal Answer: Paris"


class FakeJudge:
    """An engine that replies with the schema's JSON, scoring each leaf from VERDICTS (found in
    the prompt); it checks that every request asks for the schema, greedily."""

    name = "fake"

    def __init__(
        self, fail_after: int | None = None, name: str = "judge.gguf", sha256: str | None = "j" * 64
    ) -> None:
        self.fail_after = fail_after
        self.model = JudgeModel(name, sha256)
        self.calls: list[list[dict]] = []

    def generate(self, queue):
        while (request := queue.pop()) is not None:
            assert request.json_schema == JUDGE_SCHEMA and request.params == JUDGE_PARAMS
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise KeyboardInterrupt
            messages = request.messages
            self.calls.append(messages)
            path = re.search(r"\(leaf ([0-9.]+)\)", messages[-1]["content"]).group(1)
            reply = {"explanation": f"leaf {path}", "key_matches": ["Paris"],
                     "reasoning_score": 0.5, "correctness_score": VERDICTS[path]}  # fmt: skip
            yield Completion(request.keys[0], json.dumps(reply), "stop", 50, 20, 0.01)

    def close(self) -> None:
        pass


def judge(store, run, fake: FakeJudge):
    return judge_run(store, Run.from_row(run), fake, JudgePrompt(), model=fake.model)


def judge_tree(tmp_path, task="judge", question=FRANCE) -> tuple[Store, dict]:
    store = Store(tmp_path / "j.db")
    run = make_run(store, "rjudge", 2, task=task)
    store.add_questions(run["id"], [question])
    TreeRunner(store, Run.from_row(run), [question], FakeEngine(leaf_script), PromptSet()).execute()
    return store, run


def rows(db: Path | Store, sql: str, args=()) -> list[dict]:
    conn = sqlite3.connect(db if isinstance(db, Path) else db.path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def assert_credit_matches_rewards(db, run_id: str, n: int, theta: float) -> None:
    nodes = rows(db, "SELECT * FROM nodes WHERE run_id = ?", [run_id])
    per_q: dict[str, dict] = {}
    for node in nodes:
        per_q.setdefault(node["question_id"], {})[tuple(map(int, node["path"].split(".")))] = node
    for tree in per_q.values():
        rewards = {p: node["reward"] for p, node in tree.items() if len(p) == 3}
        for path, c in credit.assign(rewards, n, theta).items():
            assert tree[path]["value"] == pytest.approx(c.value)
            assert tree[path]["label"] == int(c.label)


# --------------------------------------------------------------------------- schema, parsing


def test_schema_becomes_a_llama_cpp_grammar():
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf = json_schema_to_gbnf(json.dumps(JUDGE_SCHEMA))
    # Scores can only be the eleven tenths; the fields come in the schema's order.
    assert '"0.5"' in gbnf and '"1.0"' in gbnf and '"0.30000000000000004"' not in gbnf
    root = next(line for line in gbnf.splitlines() if line.startswith("root ::="))
    keys = ["explanation-kv", "key-matches-kv", "reasoning-score-kv", "correctness-score-kv"]
    assert [root.index(k) for k in keys] == sorted(root.index(k) for k in keys)
    assert LlamaGrammar.from_json_schema(json.dumps(JUDGE_SCHEMA), verbose=False)
    assert SCORES == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_parse_judgement():
    ok = parse_judgement(
        '{"explanation": " right ", "key_matches": ["Paris"], "reasoning_score": 0.8,'
        ' "correctness_score": 0.5}'
    )
    assert ok.valid and ok.correctness_score == 0.5 and ok.passed and ok.reward == 1.0
    assert ok.explanation == "right" and ok.key_matches == ["Paris"]
    assert not parse_judgement(
        '{"explanation": "", "key_matches": [], "reasoning_score": 1, "correctness_score": 0.4}'
    ).passed
    # llama-cpp-python's grammar lets raw control characters into strings: accepted.
    assert parse_judgement(
        '{"explanation": "two\nlines", "key_matches": [], "reasoning_score": 0.0,'
        ' "correctness_score": 0.0}'
    ).valid
    for bad in (
        '{"explanation": "cut off", "key_ma',
        "[1, 2]",
        '{"explanation": "x", "key_matches": [], "reasoning_score": 0.5, "correctness_score": 1.5}',
        '{"explanation": "x", "key_matches": [1], "reasoning_score": 0.5, "correctness_score": 1}',
        '{"explanation": "x", "key_matches": [], "reasoning_score": true, "correctness_score": 1}',
    ):
        j = parse_judgement(bad)
        assert not j.valid and j.correctness_score is None and j.reward == 0.0


def test_judge_prompt_renders_the_question_truth_and_answer(tmp_path):
    prompt = JudgePrompt()
    msgs = prompt.messages(
        question="Q?",
        ground_truth="Paris",
        answer="It is Lyon.",
        task="judge",
        options=[("A", "Paris")],
        stated_answer="Lyon",
    )
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[-1]["content"]
    assert "Q?" in user and "Reference answer: Paris" in user and "It is Lyon." in user
    assert "A: Paris" in user
    # A prompts folder without judge.j2 falls back to the shipped one; a broken one fails.
    for role in ("generator", "verifier", "refiner"):
        (tmp_path / f"{role}.j2").write_text("{% block user %}{{ question }}{% endblock %}")
    assert JudgePrompt(tmp_path).path.parent != tmp_path
    (tmp_path / "judge.j2").write_text("{% block user %}{{ answr }}{% endblock %}")
    with pytest.raises(MaltError, match="judge template"):
        JudgePrompt(tmp_path).check()


# --------------------------------------------------------------------------- the pass


def test_task_judge_leaves_wait_for_the_judge_then_get_rewards_and_credit(tmp_path):
    store, run = judge_tree(tmp_path)
    nodes = rows(store, "SELECT * FROM nodes")
    assert len(nodes) == 14
    assert all(n["reward"] is None and n["value"] is None and n["label"] is None for n in nodes)
    assert all(n["correct"] is None for n in nodes)
    assert {n["answer"] for n in nodes if n["depth"] == 3} == {"Paris"}
    # Re-planning a tree whose leaves await the judge assigns nothing.
    TreeRunner(store, Run.from_row(run), [FRANCE], FakeEngine(leaf_script), PromptSet()).plan()
    assert all(n["value"] is None for n in rows(store, "SELECT * FROM nodes"))

    backend = FakeJudge()
    summary = judge(store, run, backend)
    assert (summary.judged, summary.already, summary.invalid, summary.credited) == (8, 0, 0, 1)
    assert summary.passed == sum(v >= PASS_THRESHOLD for v in VERDICTS.values()) == 3
    leaves = {n["path"]: n for n in rows(store, "SELECT * FROM nodes WHERE depth = 3")}
    for path, score in VERDICTS.items():
        expected = 1.0 if score >= 0.5 else 0.0
        assert leaves[path]["reward"] == expected == leaves[path]["correct"]
    assert_credit_matches_rewards(store, "rjudge", 2, 0.5)
    judged = rows(store, "SELECT * FROM judgements ORDER BY node_id")
    assert len(judged) == 8 and all(j["valid"] == 1 for j in judged)
    assert {j["model"] for j in judged} == {"judge.gguf"}
    assert json.loads(judged[0]["key_matches"]) == ["Paris"]
    # Nothing left: a second pass asks the model nothing.
    again = FakeJudge()
    assert judge(store, run, again).judged == 0 and again.calls == []
    store.close()


def test_judge_pass_resumes_after_an_interrupt(tmp_path):
    store, run = judge_tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        judge(store, run, FakeJudge(fail_after=3))
    assert len(rows(store, "SELECT * FROM judgements")) == 3
    rewarded = rows(store, "SELECT path FROM nodes WHERE depth = 3 AND reward IS NOT NULL")
    assert sorted(r["path"] for r in rewarded) == ["0.0.0", "0.0.1", "0.1.0"]
    assert all(n["value"] is None for n in rows(store, "SELECT * FROM nodes WHERE depth < 3"))
    rest = FakeJudge()
    summary = judge(store, run, rest)
    assert (summary.judged, summary.already, summary.credited) == (5, 3, 1)
    assert len(rest.calls) == 5  # no leaf judged twice
    assert_credit_matches_rewards(store, "rjudge", 2, 0.5)
    store.close()


def test_credit_missed_by_a_killed_pass_is_assigned_next_time(tmp_path):
    store, run = judge_tree(tmp_path)
    judge(store, run, FakeJudge())
    store.db.execute("UPDATE nodes SET value = NULL, label = NULL WHERE depth < 3")
    summary = judge(store, run, FakeJudge())
    assert summary.judged == 0 and summary.credited == 1
    assert_credit_matches_rewards(store, "rjudge", 2, 0.5)
    store.close()


def test_a_second_judge_model_is_refused(tmp_path):
    store, run = judge_tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        judge(store, run, FakeJudge(fail_after=2))
    with pytest.raises(MaltError, match="was judged with judge.gguf"):
        judge(store, run, FakeJudge(name="other.gguf", sha256="o" * 64))
    store.close()


def test_judge_on_a_graded_task_keeps_the_graders_rewards(tmp_path):
    q = Question("How many eggs?", "18", "gsm8k")

    def script(request, key, seed):
        path = key.rsplit("/", 1)[1]
        right = path.endswith(".0") and path.count(".") == 2
        return f"(leaf {path}) Final Answer: " + ("18" if right else "7")

    store = Store(tmp_path / "g.db")
    run = make_run(store, "rgraded", 2)
    store.add_questions(run["id"], [q])
    TreeRunner(store, Run.from_row(run), [q], FakeEngine(script), PromptSet()).execute()

    def credit_state() -> dict:
        return {
            n["id"]: (n["reward"], n["value"], n["label"])
            for n in rows(store, "SELECT * FROM nodes")
        }

    before = credit_state()
    summary = judge(store, run, FakeJudge())
    assert summary.judged == 8 and not summary.sets_rewards and summary.credited == 0
    assert credit_state() == before
    store.close()
    # The JSON export takes `evaluation` from the judge where a node was judged.
    out = tmp_path / "out"
    export(tmp_path / "g.db", out, ExportOptions(formats=("json",)))
    data = json.loads((out / "refiner_training.json").read_text())
    assert data["examples"] and "LLM judge" in data["metadata"]["evaluation"]
    for e in data["examples"]:
        path = e["node_id"].rsplit("/", 1)[1]
        assert e["evaluation"] == {
            "correctness_score": VERDICTS[path], "reasoning_score": 0.5,
            "explanation": [f"leaf {path}"], "key_matches": ["Paris"],
        }  # fmt: skip
    generators = json.loads((out / "generator_training.json").read_text())["examples"]
    for e in generators:
        assert "deterministic grader" in e["evaluation"]["explanation"][0]


def test_export_waits_for_the_judge_then_uses_its_rewards(tmp_path):
    store, run = judge_tree(tmp_path)
    store.close()
    with pytest.raises(MaltError, match="no complete trees"):
        export(tmp_path / "j.db", tmp_path / "early", ExportOptions())
    assert not (tmp_path / "early").exists()
    store = Store(tmp_path / "j.db")
    judge(store, run, FakeJudge())
    store.close()
    out = tmp_path / "out"
    manifest = export(tmp_path / "j.db", out, ExportOptions())
    prov = [
        json.loads(x) for x in (out / "provenance/refiner.sft.jsonl").read_text().split("\n") if x
    ]
    assert sorted(p["path"] for p in prov) == sorted(p for p, v in VERDICTS.items() if v >= 0.5)
    assert manifest["sources"][0]["task"] == "judge"
    assert manifest["timestamp"] == max(
        r["created_at"] for r in rows(tmp_path / "j.db", "SELECT created_at FROM judgements")
    )


# --------------------------------------------------------------------------- the real model


def test_real_task_judge_run_stores_schema_valid_verdicts_and_resumes(tmp_path, small_model):
    db = tmp_path / "judge.db"
    env = {"MALT_HOME": str(tmp_path / "home")}
    argv = ["run", "--task", "judge", "--n", "2", "--max-tokens", "16", "--limit", "1",
            "--model", str(small_model), "--db", str(db), "--json",
            str(EXAMPLES / "capitals.txt")]  # fmt: skip
    r = malt(*argv, env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["judge"]["judged"] == 8 and result["judge"]["sets_rewards"]
    assert result["judge"]["model"] == small_model.name
    judgements = rows(db, "SELECT * FROM judgements ORDER BY node_id")
    leaves = {n["id"]: n for n in rows(db, "SELECT * FROM nodes WHERE depth = 3")}
    assert len(judgements) == 8 and set(leaves) == {j["node_id"] for j in judgements}
    for j in judgements:
        # The grammar held the model to the schema: its raw reply is exactly the stored verdict.
        assert j["valid"] == 1, j["output"]
        reply = json.loads(j["output"], strict=False)  # raw newlines are allowed in strings
        assert list(reply) == ["explanation", "key_matches", "reasoning_score",
                               "correctness_score"]  # fmt: skip
        assert reply["correctness_score"] in SCORES and reply["reasoning_score"] in SCORES
        assert j["correctness_score"] == reply["correctness_score"]
        assert j["explanation"] == reply["explanation"].strip()
        assert 1 <= len(reply["explanation"]) <= 300
        assert json.loads(j["key_matches"]) == [m.strip() for m in reply["key_matches"]]
        assert len(reply["key_matches"]) <= 5
        assert all(1 <= len(m) <= 60 for m in reply["key_matches"])
        leaf = leaves[j["node_id"]]
        assert leaf["reward"] == (1.0 if j["correctness_score"] >= PASS_THRESHOLD else 0.0)
        assert j["model_sha256"] == result["config"]["model_sha256"]
    assert_credit_matches_rewards(db, result["run_id"], 2, 0.5)

    # Lose the last three verdicts as a killed pass would (rewards and values unset too).
    lost = [j["node_id"] for j in judgements[-3:]]
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("DELETE FROM judgements WHERE node_id = ?", [(x,) for x in lost])
        conn.executemany(
            "UPDATE nodes SET reward = NULL, correct = NULL, value = NULL, label = NULL "
            "WHERE id = ?", [(x,) for x in lost],
        )  # fmt: skip
        conn.execute("UPDATE nodes SET value = NULL, label = NULL WHERE depth < 3")
    conn.close()
    r = malt(*argv, env=env)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["nodes_generated"] == 0
    assert (again["judge"]["judged"], again["judge"]["already"]) == (3, 5)
    assert again["judge"]["credited"] == 1
    kept = {j["node_id"]: j["created_at"] for j in judgements[:-3]}
    now = {j["node_id"]: j["created_at"] for j in rows(db, "SELECT * FROM judgements")}
    assert len(now) == 8 and all(now[k] == v for k, v in kept.items())
    assert_credit_matches_rewards(db, result["run_id"], 2, 0.5)
    # Everything judged: a third run judges nothing, and the export reads the verdicts.
    r = malt(*argv, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["judge"]["judged"] == 0
    out = tmp_path / "out"
    manifest = export(db, out, ExportOptions(formats=("json",)))
    assert manifest["questions"]["exported"] == 1
    verdicts = {j["node_id"]: j for j in rows(db, "SELECT * FROM judgements")}
    for e in json.loads((out / "refiner_training.json").read_text())["examples"]:
        verdict = verdicts[e["node_id"]]
        assert e["evaluation"]["correctness_score"] == verdict["correctness_score"] >= 0.5


def test_real_judge_on_a_graded_task_with_judge_model(tmp_path, small_model):
    db = tmp_path / "graded.db"
    r = malt("run", "--judge-model", str(small_model), "--n", "1", "--max-tokens", "16",
             "--limit", "1", "--model", str(small_model), "--db", str(db),
             str(EXAMPLES / "gsm8k.jsonl"), env={"MALT_HOME": str(tmp_path / "home")})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "judge SmolLM2-135M-Instruct.Q4_1.gguf: 1 leaves judged" in r.stdout
    (leaf,) = rows(db, "SELECT * FROM nodes WHERE depth = 3")
    (verdict,) = rows(db, "SELECT * FROM judgements")
    assert verdict["node_id"] == leaf["id"] and verdict["valid"] == 1
    assert leaf["reward"] == float(leaf["correct"])  # the grader's, not the judge's


def test_bad_judge_model_fails_before_anything_is_written(tmp_path, small_model):
    from click.testing import CliRunner

    from malt_local.cli import cli

    db = tmp_path / "x.db"
    r = CliRunner().invoke(cli, ["run", "--judge-model", str(tmp_path / "nope.gguf"),
                                 "--model", str(small_model), "--db", str(db),
                                 str(EXAMPLES / "capitals.txt")])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert "nope.gguf" in r.stderr
    assert not db.exists()
