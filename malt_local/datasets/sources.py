"""Where `malt run` and `malt eval` get their questions: a file, or a Hub dataset's split.

One entry point so that both commands (and anything later) accept the same sources with the
same column mapping: a path goes to `loading.load_questions`, an ``hf:`` source to
`malt_local.datasets.splits` (offline, from the HF cache) and then through the same
validation (`loading.questions_from_rows`).
"""

from __future__ import annotations

from pathlib import Path

from malt_local.datasets.fields import FieldMap, map_row
from malt_local.datasets.splits import HfSource, is_hf_source, resolve, split_rows
from malt_local.questions.loading import Question, load_questions, questions_from_rows


def load_source(
    source: str | Path, task: str | None = None, fields: FieldMap | None = None
) -> list[Question]:
    """The questions of a file or an ``hf:OWNER/NAME[/CONFIG]:SPLIT`` source, `fields` renaming
    columns first (for a known Hub dataset, over its defaults)."""
    if is_hf_source(source):
        hf = HfSource.parse(str(source))
        return questions_from_rows(split_rows(resolve(hf), fields), task, str(hf))
    if not fields:
        return load_questions(source, task)
    return load_questions(source, task, lambda row, where: map_row(row, fields, where))


def source_label(source: str | Path) -> str:
    """How a source is named in tables: the ``hf:`` string as typed, else the path."""
    return str(HfSource.parse(str(source))) if is_hf_source(source) else str(source)
