"""`malt questions arithmetic`: seeded synthetic questions files
(`malt_local.questions.arithmetic`)."""

from __future__ import annotations

from pathlib import Path

import click

from malt_local.diskspace import disk_guard
from malt_local.questions.arithmetic import (
    arithmetic_questions,
    question_texts,
    to_jsonl,
    write_questions,
)
from malt_local.questions.split import split_rows


@click.group(name="questions")
def command() -> None:
    """Make questions files."""


@command.command(name="arithmetic")
@click.option("--seed", type=int, required=True, help="Seed: the same flags give the same file.")
@click.option("--count", type=int, required=True, help="How many distinct questions.")
@click.option("--steps", type=int, default=1, show_default=True, help="Operations per question.")
@click.option(
    "--digits", type=int, default=1, show_default=True, help="Digits per operand (1 to 6)."
)
@click.option(
    "--ops", default="+", show_default=True, help="Operations to draw from: any of + - *."
)
@click.option(
    "--exclude",
    "exclude_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Leave out the questions of this questions file (a train split, for a disjoint test).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="JSONL file, written whole; without it (or with -), stdout.",
)
def arithmetic_cmd(
    seed: int,
    count: int,
    steps: int,
    digits: int,
    ops: str,
    exclude_path: Path | None,
    out: Path | None,
) -> None:
    """Write multi-step arithmetic questions as GSM8K rows (graded by the gsm8k task).

    \b
    Left to right, never negative; `*` with the parentheses that keep that reading:
        malt questions arithmetic --seed 1 --count 200 --steps 2 --ops +- --out train.jsonl
    """
    exclude = question_texts(exclude_path) if exclude_path else set()
    rows = arithmetic_questions(seed, count, steps=steps, digits=digits, ops=ops, exclude=exclude)
    if out is None or str(out) == "-":
        click.echo(to_jsonl(rows), nl=False)
        return
    with disk_guard(out):
        write_questions(out, rows)


@command.command(name="split")
@click.argument("questions", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--test", "test_count", type=int, required=True, help="Questions in the test split.")
@click.option("--train", "train_count", type=int, help="Questions in the train split [the rest].")
@click.option(
    "--test-out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="JSONL file of the test split, written whole.",
)
@click.option(
    "--train-out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="JSONL file of the train split, written whole.",
)
@click.option("--task", help="Task (grader) the rows are read as [detected].")
def split_cmd(
    questions: Path,
    test_count: int,
    train_count: int | None,
    test_out: Path,
    train_out: Path,
    task: str | None,
) -> None:
    """Split a questions file into disjoint test and train files by question id (a content
    hash): the same file gives the same splits anywhere, whatever its row order.

    \b
        malt questions split validation.jsonl --test 300 --train 300 \\
            --test-out test.jsonl --train-out train.jsonl
    """
    if test_out.resolve() == train_out.resolve():
        raise click.BadParameter("--test-out and --train-out are the same file")
    test_rows, train_rows = split_rows(questions, test_count, train_count, task)
    with disk_guard(test_out):
        write_questions(test_out, test_rows)
        write_questions(train_out, train_rows)
    click.echo(f"{test_out}: {len(test_rows)} questions; {train_out}: {len(train_rows)} questions")
