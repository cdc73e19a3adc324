"""Property tests (hypothesis) for the rules every run leans on: the loaders never crash on
arbitrary bytes, answer extraction and equality never raise and behave like an equality, credit
assignment is the paper's mean of means, and DPO pairs follow `PAIRING_RULE`.

The time budget is the hypothesis profile in tests/conftest.py ("ci": bounded, derandomized).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from malt_local.db.store import JudgedNode
from malt_local.errors import MaltError
from malt_local.export.pairing import is_positive, pairs_for_group
from malt_local.grading import answers_equal, extract_answer, grade, normalize_answer
from malt_local.questions.loading import load_questions
from malt_local.run import credit

TASKS = ["gsm8k", "math", "csqa", "exact"]
OPTIONS = [("A", "bank"), ("B", "library"), ("C", "mall")]
# Model-output-like text: answer markers, numbers, LaTeX and letters among arbitrary characters.
PIECES = st.sampled_from(
    [
        "Final Answer:",
        "final answer: ",
        "The answer is ",
        "####",
        "\\boxed{",
        "}",
        "{",
        "\\frac{1}{2}",
        "$",
        "1,000",
        "-3.5",
        "1e999",
        "nan",
        "inf",
        "0x1F",
        "(B)",
        "C.",
        "\n",
        " ",
        "**",
        "\\sqrt{2}",
        "x^2",
        "=",
        "%",
        "1" * 400,  # past a float's range: was infinity, equal to every other huge number
        "/",
        " " * 3000,  # long blank runs: the Final Answer regexes once took seconds per line
    ]
)
OUTPUT = st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=12).map("".join)
ANSWER = st.one_of(OUTPUT, st.text(max_size=12))


# -- loaders ------------------------------------------------------------------------------------


@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
def test_loaders_never_crash_on_arbitrary_bytes(tmp_path_factory, data, suffix):
    p = tmp_path_factory.mktemp("fuzz") / f"q{suffix}"
    p.write_bytes(data)
    try:
        questions = load_questions(p)
    except MaltError as exc:
        assert "\n" not in exc.message  # one line, exit 2
        assert exc.exit_code == 2
        return
    assert questions and all(q.text and q.ground_truth for q in questions)


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
ROW = st.dictionaries(
    st.sampled_from(["question", "problem", "answer", "ground_truth", "options", "choices", "x"]),
    JSON_VALUE,
)


@given(rows=st.lists(ROW, max_size=4))
def test_any_json_rows_load_or_name_the_problem(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("rows") / "q.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        load_questions(p)
    except MaltError as exc:
        assert "\n" not in exc.message


# -- answers ------------------------------------------------------------------------------------


@given(text=OUTPUT, task=st.sampled_from(TASKS))
def test_extraction_and_grading_never_raise(text, task):
    options = OPTIONS if task == "csqa" else None
    answer = extract_answer(text, task, options)
    assert answer is None or isinstance(answer, str)
    assert normalize_answer(answer, task, options) is None or answer is not None
    got, reward = grade(text, "B" if task == "csqa" else "42", task, options)
    assert got == answer and reward in (0, 1)


@given(text=OUTPUT, task=st.sampled_from(TASKS))
def test_an_extracted_answer_equals_itself(text, task):
    options = OPTIONS if task == "csqa" else None
    answer = extract_answer(text, task, options)
    if answer is not None:
        assert answers_equal(answer, answer, task, options)
        assert grade(text, answer, task, options) == (answer, 1)


@given(a=ANSWER, b=ANSWER, task=st.sampled_from(TASKS))
def test_answer_equality_is_symmetric(a, b, task):
    options = OPTIONS if task == "csqa" else None
    assert answers_equal(a, b, task, options) == answers_equal(b, a, task, options)


@given(a=ANSWER, task=st.sampled_from(["gsm8k", "csqa", "exact"]))
def test_equal_keys_mean_equal_answers(a, task):
    """Majority voting groups by key: answers that share one must be equal to each other."""
    options = OPTIONS if task == "csqa" else None
    key = normalize_answer(a, task, options)
    if key is not None:
        assert answers_equal(a, key, task, options)


# -- credit -------------------------------------------------------------------------------------


@st.composite
def trees(draw):
    n = draw(st.integers(1, 4))
    leaves = list(itertools.product(range(n), repeat=3))
    rewards = {p: float(draw(st.sampled_from([0, 1]))) for p in leaves}
    theta = draw(st.sampled_from([0.0, 0.25, 0.5, 2 / 3, 1.0]))
    return n, rewards, theta


@given(tree=trees())
def test_credit_is_the_mean_of_means_and_labels_are_strictly_above_theta(tree):
    n, rewards, theta = tree
    out = credit.assign(rewards, n, theta)
    assert len(out) == n + n * n + n**3
    for path, c in out.items():
        below = [r for leaf, r in rewards.items() if leaf[: len(path)] == path]
        exact = Fraction(sum(int(r) for r in below), len(below))
        assert c.value == pytest.approx(float(exact), abs=1e-12)
        assert 0.0 <= c.value <= 1.0
        assert c.label == (c.value > theta)
    # The generator's value is also the mean of its verifiers' values (global pooling).
    for i in range(n):
        mean = sum(out[(i, j)].value for j in range(n)) / n
        assert out[(i,)].value == pytest.approx(mean, abs=1e-12)


@given(tree=trees(), drop=st.data())
def test_credit_refuses_an_incomplete_tree(tree, drop):
    n, rewards, theta = tree
    leaf = drop.draw(st.sampled_from(sorted(rewards)))
    partial = {p: r for p, r in rewards.items() if p != leaf}
    with pytest.raises(ValueError):
        credit.assign(partial, n, theta)


# -- DPO pairing --------------------------------------------------------------------------------


def node(i: int, depth: int, score: float) -> JudgedNode:
    leaf = depth == 3
    return JudgedNode(
        id=f"n{i}",
        run_id="r",
        question_id="q",
        parent_id="p" if depth > 1 else None,
        role=("generator", "verifier", "refiner")[depth - 1],
        depth=depth,
        branch=i,
        path=f"0.{i}" if depth == 2 else (f"0.0.{i}" if leaf else str(i)),
        messages="[]",
        output=f"out {i}",
        finish_reason="stop",
        answer=None,
        correct=None,
        reward=score if leaf else None,
        value=score,
        label=None,
        prompt_tokens=0,
        completion_tokens=0,
        seed=0,
        duration_ms=None,
        created_at="",
    )


@st.composite
def groups(draw):
    depth = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(1, 5))
    grid = [0.0, 1.0] if depth == 3 else [k / 9 for k in range(10)]
    scores = draw(st.lists(st.sampled_from(grid), min_size=n, max_size=n))
    theta = draw(st.sampled_from([0.0, 1 / 3, 0.5, 2 / 3]))
    max_pairs = draw(st.none() | st.integers(0, 6))
    return [node(i, depth, s) for i, s in enumerate(scores)], theta, max_pairs


@given(group=groups())
def test_dpo_pairs_follow_the_pairing_rule(group):
    siblings, theta, max_pairs = group
    pairs = pairs_for_group(siblings, theta, max_pairs)
    pos = [s for s in siblings if is_positive(s, theta)]
    neg = [s for s in siblings if not is_positive(s, theta)]
    every = len(pos) * len(neg)
    assert len(pairs) == (every if max_pairs is None else min(max_pairs, every))
    assert len({(c.id, r.id) for c, r in pairs}) == len(pairs)  # no pair twice
    margins = []
    for chosen, rejected in pairs:
        assert is_positive(chosen, theta) and not is_positive(rejected, theta)
        assert chosen.group == rejected.group
        c = chosen.reward if chosen.depth == 3 else chosen.value
        r = rejected.reward if rejected.depth == 3 else rejected.value
        assert c is not None and r is not None and c >= r
        margins.append(round(c - r, 9))
    assert margins == sorted(margins, reverse=True)
    # K pairs are the first K of the full list: a smaller cap never changes which come first.
    if max_pairs is not None:
        assert pairs == pairs_for_group(siblings, theta, None)[:max_pairs]


def test_long_blank_lines_grade_in_linear_time():
    """A line of 200,000 blanks once sent the Final Answer regexes into quadratic backtracking
    (28 s at 50,000). A child process with a generous limit turns a hang into a failure."""
    code = (
        "from malt_local.grading import grade\n"
        "for text in (' ' * 200_000 + 'x', 'final answer' + '\\t' * 200_000 + 'x',\n"
        "             '### ' + ' ' * 200_000 + 'final answer' + ' ' * 200_000):\n"
        "    for task in ('gsm8k', 'math', 'exact'):\n"
        "        grade(text, '1', task)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_numbers_past_a_float_are_compared_exactly():
    big = "1" * 400
    assert answers_equal(big, big, "gsm8k") and not answers_equal(big, big[:-1] + "2", "gsm8k")
    assert normalize_answer(big, "gsm8k") == big
    assert normalize_answer(big + "/3", "gsm8k") == big + "/3"
    assert grade(f"Final Answer: {big}", big, "gsm8k") == (big, 1)
    assert grade(f"Final Answer: -{big}", big, "gsm8k") == ("-" + big, 0)
