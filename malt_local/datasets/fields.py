"""Column mapping: a dataset's column names to the row names malt's loader reads.

Why a mapping rather than more guessing in the loader: a Hub dataset names its columns as its
authors chose (`problem`, `text`, `test_list`, `answerKey`), and a wrong guess would grade the
wrong field without a word. The flags (`--question-field`, ...) say it once for any file or
`hf:` source; the datasets the paper's benchmarks come from have it said here (`KNOWN`), so
`malt run hf:openai/gsm8k/main:test` needs no flags. A mapped column a row lacks is an error
naming the row and the flag, never a silently empty question.

The canonical names are the loader's (`malt_local.questions.loading`): ``question`` (its text),
``answer`` (the ground truth), ``options`` (CSQA choices), and for code rows ``test`` (an
assert string or a list of them), ``entry_point`` and ``canonical_solution`` (the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from malt_local.errors import MaltError

# canonical name -> the flag that sets it (the solution has no flag: nothing grades with it yet)
FLAGS = {
    "question": "--question-field",
    "answer": "--answer-field",
    "options": "--options-field",
    "test": "--tests-field",
    "entry_point": "--entry-point-field",
    "canonical_solution": "",
}
# Fields the loader prefers to the canonical one: a mapped answer must not lose to them.
_SHADOWED_BY = {"answer": ("ground_truth",)}


@dataclass(frozen=True)
class FieldMap:
    """Which column holds each canonical field (None: the row's own names are used)."""

    question: str | None = None
    answer: str | None = None
    options: str | None = None
    test: str | None = None
    entry_point: str | None = None
    canonical_solution: str | None = None

    def items(self) -> list[tuple[str, str]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)]

    def over(self, base: FieldMap | None) -> FieldMap:
        """These columns where given, `base`'s (a known dataset's defaults) elsewhere."""
        if base is None:
            return self
        return replace(base, **dict(self.items()))

    def __bool__(self) -> bool:
        return bool(self.items())


# The datasets the paper's benchmarks come from, by Hub id (lower case), with their legacy
# one-word ids. Most name their columns as the loader reads them already; listing them makes
# a renamed column upstream an error that names it rather than a row without a question.
_GSM8K = FieldMap(question="question", answer="answer")  # answers end in "#### N"
_CSQA = FieldMap(question="question", options="choices", answer="answerKey")
_MATH500 = FieldMap(question="problem", answer="answer")
_HUMANEVAL = FieldMap(
    question="prompt",
    test="test",
    entry_point="entry_point",
    canonical_solution="canonical_solution",
)
_MBPP = FieldMap(question="text", test="test_list", canonical_solution="code")
KNOWN: dict[str, FieldMap] = {
    "openai/gsm8k": _GSM8K,
    "gsm8k": _GSM8K,
    "tau/commonsense_qa": _CSQA,
    "commonsense_qa": _CSQA,
    "huggingfaceh4/math-500": _MATH500,
    "openai/openai_humaneval": _HUMANEVAL,
    "openai_humaneval": _HUMANEVAL,
    "google-research-datasets/mbpp": _MBPP,
    "mbpp": _MBPP,
}


def defaults_for(repo: str) -> FieldMap | None:
    """The known mapping of a Hub dataset id, or None."""
    return KNOWN.get(repo.lower())


def map_row(row: dict, fields_: FieldMap | None, where: str = "row") -> dict:
    """`row` with each mapped column copied under its canonical name (the others kept, so the
    loader still sees a MATH row's `problem` or a GSM8K answer's `####`)."""
    if not fields_:
        return row
    out = dict(row)
    for canonical, column in fields_.items():
        if column not in row:
            flag = FLAGS[canonical]
            how = f" (set by {flag})" if flag else ""
            raise MaltError(
                f"{where}: no field {column!r}{how} for the {canonical.replace('_', ' ')}; "
                f"the row has {', '.join(map(repr, row)) or 'no fields'}"
            )
        out[canonical] = row[column]
        for shadow in _SHADOWED_BY.get(canonical, ()):
            if shadow != column:
                out.pop(shadow, None)
    return out
