"""Questions too long for the context, found before anything is generated.

A node's prompt holds every turn above it, so the refiner's is the longest: the question in the
generator's turn, the generator's answer, the verifier's turn and critique, the refiner's turn,
and then the refiner's own answer must fit too. A question fits when the refiner's prompt with
empty answers, plus `max_tokens` for each of the three answers, fits the context one node may
use. One that does not would give nodes cut short or empty (an empty output is graded wrong and
would be valued and labelled as if the model had answered), so it gets no tree: it is recorded
in `skipped_questions` with the numbers, reported by `malt run` and `malt status`, and the rest
of the run goes on. A later `malt run` with a larger `--ctx` or smaller `--max-tokens` checks
again and builds its tree.

A question's length is bounded before it is tokenized whole: the prompt is measured on a prefix
of the question (`FIRST_PREFIX_CHARS`, doubling), and as soon as a prefix's prompt alone needs
more than the context holds, the question is too long, recorded with that count as a lower bound
(`exact` False, "at least N tokens"). A 60 MB question costs a few small tokenizations, not
gigabytes; a question that fits is measured whole, as before.

The rows are written here rather than in `store.py` so this check stays one self-contained
piece: the table is this module's alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from malt_local.db.store import Store, utcnow
from malt_local.prompts import PromptSet, TreeContext
from malt_local.questions.loading import Question

TOO_LONG = "too_long"
ANSWERS_PER_PATH = 3  # generator, verifier and refiner each answer once along a path
# The first prefix measured: longer than nearly every real question (so those are measured
# whole, in one tokenization), short enough to tokenize in milliseconds.
FIRST_PREFIX_CHARS = 16_384


@dataclass(frozen=True)
class Skipped:
    """A question that gets no tree in a run, and why, in numbers a user can act on."""

    question_id: str
    source: str
    line: int
    prompt_tokens: int  # the refiner's prompt with the answers above it left empty
    needed_tokens: int  # prompt_tokens plus max_tokens for each of the three answers
    limit_tokens: int  # the context one node may use
    reason: str = TOO_LONG
    # False: the question was measured on a prefix only, so the counts are lower bounds (its
    # whole text was never tokenized). Not stored: the table's rows keep their columns.
    exact: bool = True

    def describe(self) -> str:
        """One line: which question, how long, what to change."""
        where = f" ({self.source}:{self.line})" if self.source else ""
        at_least = "" if self.exact else "at least "
        return (
            f"question {self.question_id}{where} skipped, too long: its prompts need "
            f"{at_least}{self.needed_tokens} tokens with room to answer ({self.prompt_tokens} of "
            f"prompt + 3 x max-tokens) but a node's context holds {self.limit_tokens}; raise --ctx "
            "or lower --max-tokens"
        )


def find_too_long(
    questions: Iterable[Question],
    prompts: PromptSet,
    count_tokens: Callable[[list[dict[str, str]]], int],
    *,
    max_tokens: int,
    limit: int,
) -> list[Skipped]:
    """The questions whose longest path cannot fit `limit` tokens, in the given order."""
    budget = limit - ANSWERS_PER_PATH * max_tokens  # the most tokens the prompt may have
    out = []
    for q in questions:
        prompt, exact = measure_prompt(q, prompts, count_tokens, budget)
        needed = prompt + ANSWERS_PER_PATH * max_tokens
        if needed > limit:
            out.append(Skipped(q.id, q.source, q.line, prompt, needed, limit, exact=exact))
    return out


def measure_prompt(
    question: Question,
    prompts: PromptSet,
    count_tokens: Callable[[list[dict[str, str]]], int],
    budget: int,
) -> tuple[int, bool]:
    """Tokens of the refiner's prompt (answers empty) and whether the count is exact.

    The question (and each option) is cut to a prefix of `FIRST_PREFIX_CHARS`, doubled until it
    is the whole text or its prompt already has more than `budget` tokens; then the question
    cannot fit and the prefix's count is a lower bound. Tokenizing the whole of a huge question
    only to learn it is too long took gigabytes; this takes a few prefixes at most.
    """
    size = FIRST_PREFIX_CHARS
    while True:
        whole = len(question.text) <= size and all(len(t) <= size for _, t in question.options)
        shown = question if whole else _prefix(question, size)
        messages = prompts.messages("refiner", TreeContext(shown, generation="", critique=""))
        tokens = count_tokens(messages)
        if whole:
            return tokens, True
        if tokens > budget:
            return tokens, False
        size *= 2


def _prefix(question: Question, size: int) -> Question:
    """The question with its text and options cut to `size` characters each."""
    options = tuple((letter, text[:size]) for letter, text in question.options)
    return dataclasses.replace(question, text=question.text[:size], options=options)


def record_skipped(store: Store, run_id: str, checked: Iterable[str], skipped: list[Skipped]):
    """Replace the run's skip rows for the questions just checked (one transaction)."""
    with store.db.atomic():
        for qid in checked:
            store.db.execute(
                "DELETE FROM skipped_questions WHERE run_id = ? AND question_id = ?", [run_id, qid]
            )
        for s in skipped:
            store.db.execute(
                "INSERT INTO skipped_questions (run_id, question_id, reason, prompt_tokens, "
                "needed_tokens, limit_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    s.question_id,
                    s.reason,
                    s.prompt_tokens,
                    s.needed_tokens,
                    s.limit_tokens,
                    utcnow(),
                ],
            )


def started_questions(store: Store, run_id: str) -> set[str]:
    """Questions with at least one stored node in the run."""
    rows = store.db.execute("SELECT DISTINCT question_id FROM nodes WHERE run_id = ?", [run_id])
    return {r[0] for r in rows}


def skipped_in_run(store: Store, run_id: str) -> list[dict]:
    """The run's skipped questions in run order, for `malt status`."""
    return list(
        store.db.query(
            """SELECT s.question_id, s.reason, s.prompt_tokens, s.needed_tokens, s.limit_tokens,
                      q.source
               FROM skipped_questions s
               JOIN questions q ON q.id = s.question_id
               LEFT JOIN run_questions rq
                 ON rq.run_id = s.run_id AND rq.question_id = s.question_id
               WHERE s.run_id = ? ORDER BY rq.position, s.question_id""",
            [run_id],
        )
    )
