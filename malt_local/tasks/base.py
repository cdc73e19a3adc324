"""What a task is: how an answer is found in a model's text, compared, and rewarded.

A task is the one place that knows a kind of question. The tree (`malt run`), evaluation
(`malt eval`) and voting ask the question's task, never a table of names, so a task from a
plugin package is graded exactly as the built-in ones are. A task is a small class:

- `extract(text, question)`: the answer a model output states, or None;
- `key(answer, question)`: a canonical form, equal for answers the task calls equal (majority
  voting groups by it);
- `equal(a, b, question)`: whether two extracted answers are the same answer;
- `grade(text, question)`: the `Grade` of one output against the question's ground truth;
- `reward(grade)`: the leaf reward the tree's credit assignment starts from (1.0 / 0.0 here).

`prompt_variant` chooses the templates: a role's prompt is `prompts/<role>.<variant>.j2` when
that file exists, else `prompts/<role>.j2` (CSQA's show the options, the code task's ask for a
code block).

Optional abilities are declared as types, as the engines' are: a `RuleLess` task has no rule at
all (the LLM judge rewards its leaves later), and a `SlowGrading` task's grading runs in a pool
of workers beside generation (the code task runs programs), so the engine never waits for it.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from malt_local import grading

# The defaults below use grading.py's exact-match rules: part of every task's identity.
GRADER_FILES = [grading.__file__]


class QuestionLike(Protocol):
    """What a task reads of a question (`malt_local.questions.loading.Question`)."""

    @property
    def text(self) -> str: ...
    @property
    def ground_truth(self) -> str: ...
    @property
    def options(self) -> Sequence[tuple[str, str]]: ...


@dataclass(frozen=True)
class Grade:
    """One graded output: the answer it states, whether it is right, and why not.

    `correct` is None when the task cannot say (a `RuleLess` task). `reason` is a short line a
    user can read ("passed", "timed out after 10 s", "no code block"); tasks whose verdict needs
    no explanation leave it None.
    """

    answer: str | None
    correct: int | None
    reason: str | None = None


class Task:
    """A task with exact-match defaults: a plugin overrides what its kind of question needs.

    The defaults take the last non-empty line (after "Final Answer:" when there is one, which
    every shipped prompt asks for) and compare case- and space-insensitively.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    prompt_variant: ClassVar[str | None] = None

    def extract(self, text: str, question: QuestionLike) -> str | None:
        return grading.extract_answer(text, "exact")

    def key(self, answer: str | None, question: QuestionLike) -> str | None:
        return grading.normalize_answer(answer, "exact")

    def equal(self, a: str | None, b: str | None, question: QuestionLike) -> bool:
        ka, kb = self.key(a, question), self.key(b, question)
        return ka is not None and ka == kb

    def grade(self, text: str, question: QuestionLike) -> Grade:
        """Never raises: one output that breaks a grader is wrong, not the end of a run."""
        try:
            answer = self.extract(text, question)
        except Exception as exc:  # a plugin's bug must not stop a run of thousands
            return Grade(None, 0, f"extraction failed: {type(exc).__name__}")
        try:
            return Grade(answer, int(self.equal(answer, question.ground_truth, question)))
        except Exception as exc:
            return Grade(answer, 0, f"comparison failed: {type(exc).__name__}")

    def pending(self, text: str, question: QuestionLike) -> Grade:
        """The grade a node is stored with before its real one arrives: the stated answer
        only (a `SlowGrading` task's pool, or the judge, decides `correct` later)."""
        try:
            return Grade(self.extract(text, question), None)
        except Exception:
            return Grade(None, None)

    def reward(self, grade: Grade) -> float | None:
        return None if grade.correct is None else float(grade.correct)

    # identity ------------------------------------------------------------------------------

    @property
    def variant(self) -> str:
        """The template variant: `prompt_variant`, else the task's name."""
        return self.prompt_variant or self.name

    def source_files(self) -> list[Path]:
        """The files whose code decides this task's grades (hashed into its identity): the
        module of every class in its MRO, `Task`'s own included (its defaults are many tasks'
        rules), and the files a module names in `GRADER_FILES`."""
        out: list[Path] = []
        for cls in type(self).__mro__:
            if cls is object:
                continue
            try:
                path = inspect.getsourcefile(cls)
            except TypeError:  # a class made at run time
                path = None
            if path and Path(path) not in out:
                out.append(Path(path))
            module = sys.modules.get(cls.__module__)
            for extra in getattr(module, "GRADER_FILES", ()):
                if Path(extra) not in out:
                    out.append(Path(extra))
        return out

    def source_sha256(self) -> str:
        digest = hashlib.sha256()
        for path in self.source_files():
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(str(path).encode())
        return digest.hexdigest()

    def identity(self) -> str:
        """`name@version:source` - part of a run's identity, so a changed grader is noticed
        when a run is resumed (its stored rewards were given by the old one)."""
        return f"{self.name}@{self.version}:{self.source_sha256()[:12]}"


class RuleLess(Task):
    """No rule can grade it: a run stores its leaves' rewards as NULL until the LLM judge
    (`--judge`) gives them. `grade` is then only a rough check (evaluation reports it as one)."""


class SlowGrading(Task):
    """Grading takes real time (it runs programs): the tree grades these in a worker pool
    beside generation and stores each node's grade when it is ready."""

    workers: ClassVar[int] = 2

    def cancel(self) -> None:
        """Stop the gradings in flight now (malt is interrupted); their grades are dropped and
        the next run grades those outputs again. Default: nothing to stop, they finish."""
