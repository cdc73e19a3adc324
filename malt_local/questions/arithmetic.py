"""Synthetic multi-step arithmetic questions, seeded, with the difficulty as parameters.

Why: a study on a tiny model needs questions it gets neither always nor never right, and a
knob to move between the two. SmolLM2-135M's generator answers 56% of single-digit sums and 4%
of two-digit sums, so `steps` (how many operations) and `digits` (how long each operand is)
are the knobs, and `ops` adds subtraction and multiplication.

The rows have the GSM8K shape (`answer` ends in ``#### N``), so `malt run` grades them with
the numeric `gsm8k` task. The rules, so that a question has one reading and one answer:

- The operations are applied left to right: ``What is 3 + 5 - 2?`` is (3 + 5) - 2. With ``*``
  the text still reads by the usual precedence, so parentheses are written exactly where left
  to right differs from it: ``What is (3 + 5) * 2?``, but ``What is 3 * 5 + 2?``.
- No intermediate result and no answer is negative: subtraction never goes below zero, so the
  task stays arithmetic rather than signed numbers.
- Every operand has exactly `digits` digits (1: 0..9, 2: 10..99, ...).
- Every question allowed (all questions of the shape, less `exclude`) is equally likely, and no
  question text comes twice in one call. When fewer exist than `count` asks for, a `MaltError`
  says so.
- The same arguments give the same rows: only `random.Random(seed)` draws.

`exclude` is how a test split is made disjoint from a train split: generate the train file,
then the test file with ``--exclude train.jsonl``.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Collection, Iterable
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.paths import write_text_atomic
from malt_local.questions.loading import load_questions

OPS = "+-*"
MAX_DIGITS = 6
# Longer chains with `*` reach numbers past Python's int-to-text limit (4300 digits), and no
# small model is tested by a question that long.
MAX_STEPS = 20
# A shape with at most this many questions (before the non-negative rule) is listed whole, so
# "too few questions" is exact; a larger one is sampled.
_ENUMERATE_UP_TO = 20_000
# Sampling a larger shape gives up when this many draws in a row gave no new question: 30 for
# each question of the shape (so a count that takes all of it fails by chance about e**-30 of
# the time), at least 100,000 and at most 2,000,000 (a shape where nearly every draw goes
# negative, `-` alone on long chains, is refused in seconds).
_FRUITLESS_PER_QUESTION = 30
_FRUITLESS_DRAWS = (100_000, 2_000_000)
_OP_CODES = {"+": "a", "-": "s", "*": "m"}

# One question before it is written out: the first operand, then (operation, operand) pairs.
Chain = tuple[int, tuple[tuple[str, int], ...]]


def arithmetic_questions(
    seed: int,
    count: int,
    steps: int = 1,
    digits: int = 1,
    ops: str = "+",
    exclude: Collection[str] = (),
) -> list[dict]:
    """`count` distinct questions of `steps` operations on `digits`-digit operands, as GSM8K
    rows ``{"question", "answer", "id"}``; none whose text is in `exclude`."""
    ops = check_shape(count, steps, digits, ops)
    rng = random.Random(seed)
    low, high = operand_range(digits)
    size = (high - low + 1) ** (steps + 1) * len(ops) ** steps
    if size <= _ENUMERATE_UP_TO:
        chains = _sample_listed(rng, count, steps, low, high, ops, set(exclude))
    else:
        low_cap, high_cap = _FRUITLESS_DRAWS
        give_up = min(max(low_cap, _FRUITLESS_PER_QUESTION * size), high_cap)
        chains = _sample_drawn(rng, count, steps, low, high, ops, set(exclude), give_up)
    name = "".join(_OP_CODES[op] for op in ops)
    return [
        _row(chain, f"arith-s{seed}-k{steps}-d{digits}-{name}-{i}")
        for i, chain in enumerate(chains)
    ]


def check_shape(count: int, steps: int, digits: int, ops: str) -> str:
    """The operations in their canonical order; any value out of range is a `MaltError`."""
    if count < 1:
        raise MaltError(f"--count must be at least 1 (got {count})")
    if not 1 <= steps <= MAX_STEPS:
        raise MaltError(f"--steps must be between 1 and {MAX_STEPS} (got {steps})")
    if not 1 <= digits <= MAX_DIGITS:
        raise MaltError(f"--digits must be between 1 and {MAX_DIGITS} (got {digits})")
    unknown = sorted(set(ops) - set(OPS))
    if unknown or not ops:
        raise MaltError(f"--ops takes the characters + - * (got {ops!r})")
    return "".join(op for op in OPS if op in ops)


def operand_range(digits: int) -> tuple[int, int]:
    """The smallest and largest operand of `digits` digits: 1 digit is 0..9, as people count."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def _sample_listed(
    rng: random.Random, count: int, steps: int, low: int, high: int, ops: str, exclude: set[str]
) -> list[Chain]:
    numbers = range(low, high + 1)
    chains = []
    for first, *rest in itertools.product(numbers, repeat=steps + 1):
        for chosen in itertools.product(ops, repeat=steps):
            chain = (first, tuple(zip(chosen, rest, strict=True)))
            if _value(chain) is not None and question_text(chain) not in exclude:
                chains.append(chain)
    if len(chains) < count:
        found = f"only {len(chains)}"
        raise MaltError(_too_few(count, steps, low, high, ops, exclude, found))
    return rng.sample(chains, count)


def _sample_drawn(
    rng: random.Random,
    count: int,
    steps: int,
    low: int,
    high: int,
    ops: str,
    exclude: set[str],
    give_up: int,
) -> list[Chain]:
    chains: list[Chain] = []
    seen = set(exclude)
    fruitless = 0
    while len(chains) < count:
        chain = _draw(rng, steps, low, high, ops)
        text = question_text(chain) if chain else ""
        if chain is None or text in seen:
            fruitless += 1
            if fruitless >= give_up:
                found = f"{give_up} draws in a row found none new after {len(chains)}"
                raise MaltError(_too_few(count, steps, low, high, ops, exclude, found))
            continue
        fruitless = 0
        seen.add(text)
        chains.append(chain)
    return chains


def _draw(rng: random.Random, steps: int, low: int, high: int, ops: str) -> Chain | None:
    """One chain, every operand and operation uniform; None as soon as a result goes negative
    (the same as drawing it whole and rejecting it, only sooner)."""
    first = value = rng.randint(low, high)
    pairs = []
    for _ in range(steps):
        op, operand = rng.choice(ops), rng.randint(low, high)
        value = _apply(value, op, operand)
        if value < 0:
            return None
        pairs.append((op, operand))
    return first, tuple(pairs)


def _too_few(
    count: int, steps: int, low: int, high: int, ops: str, exclude: set[str], found: str
) -> str:
    less = " outside --exclude" if exclude else ""
    return (
        f"--count {count} is more than there are: {found} questions of {steps} step(s) over "
        f"{low}..{high} with ops {ops!r}{less}; lower --count or widen the questions "
        "(--steps, --digits, --ops)"
    )


def _value(chain: Chain) -> int | None:
    """The chain's value, left to right; None when a result on the way is negative."""
    value, pairs = chain
    for op, operand in pairs:
        value = _apply(value, op, operand)
        if value < 0:
            return None
    return value


def _apply(left: int, op: str, right: int) -> int:
    return left + right if op == "+" else left - right if op == "-" else left * right


def question_text(chain: Chain) -> str:
    """``What is 3 + 5 * 2?`` as written, with the parentheses that make the usual precedence
    read the chain left to right (only before a ``*`` whose left side has a ``+`` or ``-``)."""
    first, pairs = chain
    expression, loose = str(first), False
    for op, operand in pairs:
        if op == "*" and loose:
            expression, loose = f"({expression})", False
        expression = f"{expression} {op} {operand}"
        loose = loose or op != "*"
    return f"What is {expression}?"


def _row(chain: Chain, row_id: str) -> dict:
    """The GSM8K row: a worked solution, one line per operation, then ``#### N``."""
    value, pairs = chain
    lines = []
    for op, operand in pairs:
        result = _apply(value, op, operand)
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    lines.append(f"#### {value}")
    return {"question": question_text(chain), "answer": "\n".join(lines), "id": row_id}


def question_texts(path: str | Path) -> set[str]:
    """The question texts of a questions file, read as `malt run` reads it (`--exclude`)."""
    return {question.text for question in load_questions(path)}


def write_questions(path: Path, rows: Iterable[dict]) -> None:
    """The rows as a JSON Lines file that appears whole (`paths.write_text_atomic`)."""
    write_text_atomic(path, to_jsonl(rows))


def to_jsonl(rows: Iterable[dict]) -> str:
    """JSON Lines, one row a line, UTF-8 text as is."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
