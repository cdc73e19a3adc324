"""`malt questions split`: a train and a test split of one questions file, by question id.

A question's id is a hash of its content (`loading.question_id`), so ordering the rows by id
is a shuffle no seed or file order can change: the same file gives the same splits on any
machine, a reordered copy of it too, and the two splits never share a question (duplicates are
one question). The test split takes the first rows in that order, the train split the next.
The rows are written as they were read, so every column the file had (ids, options) stays.
"""

from __future__ import annotations

from pathlib import Path

from malt_local.errors import MaltError
from malt_local.questions.formats import read_rows
from malt_local.questions.loading import load_questions


def split_rows(
    path: Path, test: int, train: int | None = None, task: str | None = None
) -> tuple[list[dict], list[dict]]:
    """(test rows, train rows): `test` rows first in id order, then `train` rows (None: all the
    rest). Every row is read and checked as `malt run` reads it first."""
    if test < 1:
        raise MaltError(f"--test must be at least 1 (got {test})")
    if train is not None and train < 1:
        raise MaltError(f"--train must be at least 1 (got {train})")
    questions = sorted(load_questions(path, task), key=lambda q: q.id)
    wanted = test + (train if train is not None else 1)
    if len(questions) < wanted:
        raise MaltError(
            f"{path} has {len(questions)} distinct questions; --test {test}"
            + (f" and --train {train}" if train is not None else " and a train split")
            + f" need {wanted}"
        )
    rows = dict(read_rows(path))
    ordered = [rows[q.line] for q in questions]
    rest = ordered[test:] if train is None else ordered[test : test + train]
    return ordered[:test], rest
