"""Tasks: how answers are extracted, compared and rewarded (built-in ones and plugins)."""

from malt_local.tasks.base import Grade, QuestionLike, RuleLess, SlowGrading, Task
from malt_local.tasks.registry import (
    TaskInfo,
    check_task,
    get_task,
    known_tasks,
    task_identities,
    task_names,
)

__all__ = [
    "Grade",
    "QuestionLike",
    "RuleLess",
    "SlowGrading",
    "Task",
    "TaskInfo",
    "check_task",
    "get_task",
    "known_tasks",
    "task_identities",
    "task_names",
]
