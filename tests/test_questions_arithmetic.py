"""`malt questions arithmetic`: seeded, distinct, right, and read back by malt as gsm8k questions.

The answers are checked against the question text itself, evaluated here by Python's own
parser with the usual precedence, never by the generator's left-to-right evaluation: that is
what proves the parentheses make the text mean what the answer says.
"""

from __future__ import annotations

import ast
import json

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.errors import MaltError
from malt_local.questions.arithmetic import arithmetic_questions, write_questions
from malt_local.questions.loading import load_questions
from tests.conftest import malt

SHAPES = [
    (1, 1, "+"),
    (3, 1, "+-"),
    (2, 2, "+-*"),
    (4, 1, "+-*"),
    (5, 3, "-+"),
    (1, 6, "*"),
]


def expression(question: str) -> ast.expr:
    assert question.startswith("What is ") and question.endswith("?"), question
    return ast.parse(question[len("What is ") : -1], mode="eval").body


def evaluate(node: ast.expr, seen: list[int]) -> int:
    """The value by the usual precedence; every intermediate value goes into `seen`."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    assert isinstance(node, ast.BinOp), ast.dump(node)
    left, right = evaluate(node.left, seen), evaluate(node.right, seen)
    value = {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
    seen.append(value)
    return value


def operands(node: ast.expr) -> list[int]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]


def operators(node: ast.expr) -> list[str]:
    names = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}
    return [names[type(n.op)] for n in ast.walk(node) if isinstance(n, ast.BinOp)]


@pytest.mark.parametrize(("steps", "digits", "ops"), SHAPES)
def test_answers_are_the_value_of_the_question_text(steps, digits, ops):
    rows = arithmetic_questions(seed=7, count=60, steps=steps, digits=digits, ops=ops)
    assert len(rows) == 60
    for row in rows:
        tree = expression(row["question"])
        seen: list[int] = []
        value = evaluate(tree, seen)
        assert row["answer"].endswith(f"\n#### {value}"), row
        assert min(seen) >= 0, row  # never negative on the way
        assert len(row["answer"].splitlines()) == steps + 1  # one worked line per operation
        assert len(operators(tree)) == steps
        assert set(operators(tree)) <= set(ops)
        assert all(len(str(n)) == digits for n in operands(tree)), row
        assert row["id"].startswith(f"arith-s7-k{steps}-d{digits}-")


def test_parentheses_only_where_left_to_right_needs_them():
    rows = arithmetic_questions(seed=3, count=300, steps=3, digits=1, ops="+-*")
    texts = [row["question"] for row in rows]
    assert any("(" in t for t in texts) and any("*" in t and "(" not in t for t in texts)
    assert all(" - (" not in t and " + (" not in t and " * (" not in t for t in texts)
    assert not any("(" in t for t in (r["question"] for r in arithmetic_questions(3, 50, 3)))


def test_the_same_seed_gives_the_same_rows_and_another_seed_others():
    a = arithmetic_questions(seed=1, count=40, steps=2, digits=2, ops="+-")
    assert a == arithmetic_questions(seed=1, count=40, steps=2, digits=2, ops="+-")
    assert a != arithmetic_questions(seed=2, count=40, steps=2, digits=2, ops="+-")
    # Small shapes are listed whole and sampled: still seeded.
    small = arithmetic_questions(seed=1, count=10)
    assert small == arithmetic_questions(seed=1, count=10)
    assert small != arithmetic_questions(seed=2, count=10)
    # The order of --ops is not part of the shape.
    assert a == arithmetic_questions(seed=1, count=40, steps=2, digits=2, ops="-+")


def test_the_questions_are_distinct_up_to_the_whole_space():
    # 1 step of single digits with + is 100 questions: all of them, once each.
    rows = arithmetic_questions(seed=5, count=100)
    assert len({row["question"] for row in rows}) == 100
    big = arithmetic_questions(seed=5, count=2000, steps=3, digits=1, ops="+-")
    assert len({row["question"] for row in big}) == 2000
    assert len({row["id"] for row in big}) == 2000


def test_too_small_a_space_is_one_error():
    with pytest.raises(MaltError, match="only 100 questions"):
        arithmetic_questions(seed=1, count=101)
    # a - b >= 0 over 0..9: 55 questions.
    assert len(arithmetic_questions(seed=1, count=55, ops="-")) == 55
    with pytest.raises(MaltError, match="only 55 questions"):
        arithmetic_questions(seed=1, count=56, ops="-")
    # Too large to list (90 * 90 * 3 operands and ops), so drawn: 8100 sums, 8100 products and
    # 4095 differences that are not negative, every one of them found.
    every = arithmetic_questions(seed=1, count=20295, digits=2, ops="+-*")
    assert len({row["question"] for row in every}) == 20295
    with pytest.raises(MaltError, match="draws in a row found none new after 20295 questions"):
        arithmetic_questions(seed=1, count=20296, digits=2, ops="+-*")
    # Ten subtractions of two-digit numbers from a two-digit one never stay
    # at or above zero.
    with pytest.raises(MaltError, match="draws in a row"):
        arithmetic_questions(seed=1, count=1, steps=10, digits=2, ops="-")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "--count"),
        ({"count": 1, "steps": 0}, "--steps"),
        ({"count": 1, "steps": 21}, "--steps"),
        ({"count": 1, "digits": 0}, "--digits"),
        ({"count": 1, "digits": 7}, "--digits"),
        ({"count": 1, "ops": "/"}, "--ops"),
        ({"count": 1, "ops": ""}, "--ops"),
    ],
)
def test_bad_values_are_errors(kwargs, message):
    with pytest.raises(MaltError, match=message):
        arithmetic_questions(seed=1, **kwargs)


def test_exclude_gives_a_disjoint_set():
    train = arithmetic_questions(seed=1, count=60)
    texts = {row["question"] for row in train}
    test = arithmetic_questions(seed=2, count=40, exclude=texts)
    assert texts.isdisjoint(row["question"] for row in test)
    with pytest.raises(MaltError, match="only 40 questions .* outside --exclude"):
        arithmetic_questions(seed=2, count=41, exclude=texts)
    large = arithmetic_questions(seed=1, count=500, steps=3, ops="+-")
    texts = {row["question"] for row in large}
    other = arithmetic_questions(seed=1, count=500, steps=3, ops="+-", exclude=texts)
    assert texts.isdisjoint(row["question"] for row in other)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["questions", "arithmetic", *args])


def test_the_file_is_read_back_as_gsm8k_questions(tmp_path):
    out = tmp_path / "split" / "train.jsonl"
    result = invoke(
        "--seed", "4", "--count", "30", "--steps", "2", "--ops", "+-*", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = load_questions(out)
    assert len(questions) == 30
    assert [q.task for q in questions] == ["gsm8k"] * 30
    for row, question in zip(rows, questions, strict=True):
        assert question.text == row["question"]
        assert int(question.ground_truth) == evaluate(expression(row["question"]), [])
        assert question.extra["id"] == row["id"]
    assert [p.name for p in out.parent.iterdir()] == ["train.jsonl"]  # no temporary file left


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "q.jsonl"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("malt_local.paths.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_questions(out, arithmetic_questions(seed=1, count=5))
    assert list(tmp_path.iterdir()) == []


def test_stdout_is_the_same_rows(tmp_path):
    out = tmp_path / "q.jsonl"
    args = ("--seed", "9", "--count", "12", "--digits", "2")
    assert invoke(*args, "--out", str(out)).exit_code == 0
    for extra in ((), ("--out", "-")):
        result = invoke(*args, *extra)
        assert result.exit_code == 0
        assert result.output == out.read_text()


def test_exclude_file_makes_a_disjoint_test_split(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    assert invoke("--seed", "1", "--count", "70", "--out", str(train)).exit_code == 0
    result = invoke("--seed", "2", "--count", "30", "--exclude", str(train), "--out", str(test))
    assert result.exit_code == 0, result.output
    train_texts = {q.text for q in load_questions(train)}
    test_texts = {q.text for q in load_questions(test)}
    assert len(train_texts) == 70 and len(test_texts) == 30
    assert train_texts.isdisjoint(test_texts)
    # The 100 single-digit sums are now all used: one more is an error, and no file.
    again = tmp_path / "more.jsonl"
    result = invoke("--seed", "3", "--count", "31", "--exclude", str(train), "--out", str(again))
    assert result.exit_code == 2 and not again.exists()


@pytest.mark.parametrize(
    "args",
    [
        ("--count", "0"),
        ("--count", "5", "--steps", "0"),
        ("--count", "5", "--digits", "0"),
        ("--count", "5", "--digits", "7"),
        ("--count", "5", "--ops", "+/"),
        ("--count", "101"),
        ("--count", "x"),
        ("--count", "5", "--exclude", "missing.jsonl"),
    ],
)
def test_bad_flags_exit_2_with_one_line_and_no_file(tmp_path, args):
    out = tmp_path / "q.jsonl"
    result = malt("questions", "arithmetic", "--seed", "1", *args, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("Error: ")
    assert list(tmp_path.iterdir()) == []
