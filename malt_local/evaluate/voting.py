"""Majority voting over the answers of k independent passes (the paper's MV@k).

MALT's test-time protocol runs the chain k = 3 times and keeps the answer most passes agree on
(paper §5). The paper does not say how answers are compared or how ties are broken, so this
module fixes both, without any model, so every vote can be recomputed from stored answers:

* **Same answer** means what the grader means: two answers are one vote when
  `grading.answers_equal` calls them equal for the question's task, so ``0.5``, ``1/2`` and
  ``\\frac12`` vote together on MATH, ``18`` and ``18.00`` on GSM8K, ``B`` and the text of option
  B on CommonsenseQA. The normalised key (`grading.normalize_answer`) is tried first because it
  is cheap; the symbolic comparison only runs when the keys differ.
* **Groups** are formed in pass order: an answer joins the first earlier group whose
  representative (the group's first answer) it equals, otherwise it opens a new group. The
  result therefore never depends on anything but the answers and their order.
* **Winner**: the group with the most votes. **Tie rule**: among groups with equally many votes,
  the one whose first vote came earliest (the lowest pass index) wins. Pass order is fixed by
  the passes' seeds, not by timing, so the rule is deterministic.
* **No answer** (None: the output stated none) is never a candidate while any pass stated an
  answer, however many passes stated none; only when every pass stated none is the result "no
  answer", which grades as wrong.

The winner's correctness is the grade of its representative pass, which is the grade of the
winning answer itself (`grade` compares that answer with the ground truth).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from malt_local.grading import Options
from malt_local.tasks import get_task

Same = Callable[[str, str], bool]


@dataclass(frozen=True)
class VoteGroup:
    """Passes whose answers are one vote: the first (representative) answer and its passes."""

    answer: str
    passes: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.passes)

    @property
    def first(self) -> int:
        return self.passes[0]


@dataclass(frozen=True)
class VoteResult:
    """The outcome of one vote.

    `index` is the pass whose answer represents the winner (the first pass that voted for it),
    or None when no pass stated an answer. `groups` are in first-occurrence order.
    """

    answer: str | None
    index: int | None
    count: int
    total: int
    groups: tuple[VoteGroup, ...]

    @property
    def tied(self) -> bool:
        """Whether another group had as many votes as the winner (the tie rule decided)."""
        return sum(1 for g in self.groups if g.count == self.count) > 1


def majority_vote(answers: Sequence[str | None], same: Same) -> VoteResult:
    """Group `answers` (in pass order) with `same` and pick the winner by the module's rule."""
    groups: list[tuple[str, list[int]]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for rep, members in groups:
            if same(rep, answer):
                members.append(i)
                break
        else:
            groups.append((answer, [i]))
    frozen = tuple(VoteGroup(rep, tuple(members)) for rep, members in groups)
    if not frozen:
        return VoteResult(None, None, len(answers), len(answers), ())
    # max() keeps the first of equal maxima, and groups are in first-occurrence order:
    # that is exactly the tie rule.
    best = max(frozen, key=lambda g: g.count)
    return VoteResult(best.answer, best.first, best.count, len(answers), frozen)


@dataclass(frozen=True)
class _Shape:
    """The part of a question voting knows: its options (a task's key may need them)."""

    options: tuple[tuple[str, str], ...]
    text: str = ""
    ground_truth: str = ""


def grader_same(task: str, options: Options = None) -> Same:
    """`same` for a task: the grader's notion of equal answers, cheap key comparison first."""

    rules = get_task(task)
    shape = _Shape(tuple(options or ()))

    def same(a: str, b: str) -> bool:
        try:
            ka, kb = rules.key(a, shape), rules.key(b, shape)
            if ka is not None and ka == kb:
                return True
            return rules.equal(a, b, shape)
        except Exception:
            # A grader failure on one pair must not end an evaluation: the two answers simply
            # stay separate votes.
            return False

    return same


def vote(answers: Sequence[str | None], task: str, options: Options = None) -> VoteResult:
    """Majority vote over extracted answers of one question, compared like the grader does."""
    return majority_vote(answers, grader_same(task, options))
