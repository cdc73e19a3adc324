"""Questions too long for the context: reported before generation, never stored as answered."""

from __future__ import annotations

import json

from malt_local.prompts import PromptSet, TreeContext
from malt_local.questions.loading import Question, load_questions
from malt_local.run.too_long import find_too_long
from tests.conftest import EXAMPLES, malt
from tests.test_run_e2e import rows


def words(messages):
    """A stand-in tokenizer for the rule alone: one token per whitespace-separated word."""
    return sum(len(m["content"].split()) for m in messages)


def test_the_rule_counts_the_refiner_prompt_and_three_answers():
    short = Question("What is 6 * 7?", "42", "gsm8k", source="q.jsonl", line=1)
    long = Question("word " * 500 + "?", "1", "gsm8k", source="q.jsonl", line=2)
    prompts = PromptSet()
    base = words(prompts.messages("refiner", TreeContext(short, generation="", critique="")))
    limit = base + 3 * 100  # the short question fits exactly with max_tokens 100
    (skipped,) = find_too_long([short, long], prompts, words, max_tokens=100, limit=limit)
    assert skipped.question_id == long.id and skipped.line == 2
    # "What is 6 * 7?" is 5 words, "word"*500+"?" 501: each place the question stands in the
    # refiner's prompt adds 496.
    refiner = prompts.messages("refiner", TreeContext(short, generation="", critique=""))
    times = sum(m["content"].count(short.text) for m in refiner)
    assert times >= 1
    assert skipped.prompt_tokens == base + times * (500 - 4)
    assert skipped.needed_tokens == skipped.prompt_tokens + 300
    assert skipped.limit_tokens == limit
    # One token less of room and the short one is too long as well.
    assert len(find_too_long([short], prompts, words, max_tokens=100, limit=limit - 1)) == 1
    assert "raise --ctx or lower --max-tokens" in skipped.describe()
    assert f"(q.jsonl:2) skipped, too long: its prompts need {skipped.needed_tokens}" in (
        skipped.describe()
    )


def test_default_templates_hold_the_question_once():
    """The verifier and refiner turns no longer repeat what the first turn already holds."""
    for q in [
        Question("What is 6 * 7 (uniquely worded)?", "42", "gsm8k"),
        load_questions(EXAMPLES / "csqa.jsonl")[0],
    ]:
        messages = PromptSet().messages("refiner", TreeContext(q, "an answer", "a critique"))
        text = "\n".join(m["content"] for m in messages)
        assert text.count(q.text) == 1
        first_user = next(m for m in messages if m["role"] == "user")
        assert q.text in first_user["content"]  # the generator's turn, seen by every role
        for _, option in q.options:
            assert text.count(f": {option}") == 1


def test_real_run_skips_a_too_long_question_and_builds_the_rest(tmp_path, small_model):
    long_q = "Count the apples. " + " ".join(f"Basket {i} holds {i} apples." for i in range(120))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"})
        + "\n"
        + json.dumps({"question": long_q + " How many?", "answer": "#### 7140"})
        + "\n"
    )
    db = tmp_path / "fit.db"
    args = ["run", "--n", "1", "--max-tokens", "8", "--model", str(small_model), "--db", str(db)]
    r = malt(*args, "--ctx", "512", str(qfile))
    assert r.returncode == 0, r.stderr
    assert "2 questions" in r.stdout and "1 skipped as too long" in r.stdout
    (line,) = [ln for ln in r.stderr.splitlines() if "too long" in ln]
    assert f"{qfile}:2) skipped, too long" in line and "holds 512" in line
    long_id = load_questions(qfile)[1].id
    (skip,) = rows(db, "SELECT * FROM skipped_questions")
    assert (skip["question_id"], skip["reason"], skip["limit_tokens"]) == (long_id, "too_long", 512)
    assert skip["needed_tokens"] == skip["prompt_tokens"] + 3 * 8 > 512
    nodes = rows(db, "SELECT question_id, output, completion_tokens FROM nodes")
    assert len(nodes) == 3 and long_id not in {n["question_id"] for n in nodes}

    status = malt("status", "--db", str(db), "--json")
    (run,) = json.loads(status.stdout)["runs"]
    assert [s["question_id"] for s in run["too_long"]] == [long_id]
    assert run["nodes_expected"] == 3 and run["questions"] == 2
    text = malt("status", "--db", str(db)).stdout
    assert f"skipped, too long: {long_id}" in text

    # With room for it, the same run builds its tree and forgets the skip.
    r = malt(*args, "--ctx", "2048", "--json", str(qfile))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["too_long"] == [] and out["nodes_generated"] == 3
    assert rows(db, "SELECT * FROM skipped_questions") == []
    long_nodes = rows(db, "SELECT * FROM nodes WHERE question_id = ?", [long_id])
    assert len(long_nodes) == 3 and all(n["completion_tokens"] > 0 for n in long_nodes)
