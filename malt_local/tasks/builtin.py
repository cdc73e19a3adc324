"""The built-in tasks, as tasks of the same interface a plugin implements.

Their rules live in `malt_local.grading` (pure functions, fuzzed and unit-tested on their own);
this module only gives each rule set its task. grading.py is in every task's identity
(`Task.source_files`): a change to the shared rules is a change to every grader.
"""

from __future__ import annotations

from malt_local import grading
from malt_local.tasks.base import Grade, QuestionLike, RuleLess, Task


def _options(question: QuestionLike) -> grading.Options:
    return list(question.options) or None


class _Rules(Task):
    """A task graded by `malt_local.grading`'s rules named `rules`."""

    rules = "exact"

    def extract(self, text: str, question: QuestionLike) -> str | None:
        return grading.extract_answer(text, self.rules, _options(question))

    def key(self, answer: str | None, question: QuestionLike) -> str | None:
        return grading.normalize_answer(answer, self.rules, _options(question))

    def equal(self, a: str | None, b: str | None, question: QuestionLike) -> bool:
        return grading.answers_equal(a, b, self.rules, _options(question))

    def grade(self, text: str, question: QuestionLike) -> Grade:
        answer, correct = grading.grade(text, question.ground_truth, self.rules, _options(question))
        return Grade(answer, correct)


class GSM8K(_Rules):
    name = rules = "gsm8k"
    description = "a number (GSM8K): compared numerically"


class MATH(_Rules):
    name = rules = "math"
    description = "a LaTeX expression (MATH): symbolic equivalence via math_verify"


class CSQA(_Rules):
    name = rules = "csqa"
    description = "an option letter (CommonsenseQA): the letter or the option's text"


class Exact(_Rules):
    name = rules = "exact"
    description = "any string: case- and space-insensitive exact match"


class Judge(RuleLess, _Rules):
    """Free-form answers: the stated answer is still extracted (and voting can group equal
    ones), the reward comes from the LLM judge."""

    name = "judge"
    rules = "exact"
    description = "free-form answers rewarded by the LLM judge (malt run --judge)"


BUILTIN: tuple[type[Task], ...] = (GSM8K, MATH, CSQA, Exact, Judge)
