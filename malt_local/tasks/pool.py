"""Slow grades in worker threads beside generation (`SlowGrading` tasks: the code task).

The tree and evaluation store a slow task's output at once with its grade pending, hand the
output to this pool and keep generating; they collect finished grades between completions and
write them from their own thread (a SQLite connection is not shared with the workers). What is
still pending when a run is stopped stays pending in the database, and the next run grades it.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Generic, TypeVar

from malt_local.tasks.base import Grade, QuestionLike, SlowGrading

Token = TypeVar("Token")


class GradingPool(Generic[Token]):
    """Grades keyed by the caller's `token` (a node id and what it needs to store the grade)."""

    def __init__(self) -> None:
        self._executor: cf.ThreadPoolExecutor | None = None
        self._jobs: dict[cf.Future[Grade], Token] = {}
        self._tasks: dict[int, SlowGrading] = {}

    def submit(self, task: SlowGrading, text: str, question: QuestionLike, token: Token) -> None:
        if self._executor is None:
            self._executor = cf.ThreadPoolExecutor(task.workers, thread_name_prefix="malt-grade")
        self._jobs[self._executor.submit(task.grade, text, question)] = token
        self._tasks[id(task)] = task

    def ready(self, *, wait: bool = False) -> list[tuple[Token, Grade]]:
        """The grades finished so far (every one with `wait`), each handed out once. A grader
        that raised grades its output 0 with the error as the reason: it must not end a run."""
        if wait and self._jobs:
            cf.wait(self._jobs)
        out = []
        for future in [f for f in self._jobs if f.done()]:
            token = self._jobs.pop(future)
            try:
                grade = future.result()
            except Exception as exc:
                grade = Grade(None, 0, f"grader failed: {type(exc).__name__}: {exc}"[:200])
            out.append((token, grade))
        return out

    def close(self) -> None:
        """Stop without waiting: interrupted, what is not graded stays pending for next time."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            if any(not f.done() for f in self._jobs):
                for task in self._tasks.values():
                    task.cancel()  # or exiting would wait for each program in flight
            self._executor = None
        self._jobs.clear()

    def __len__(self) -> int:
        return len(self._jobs)
