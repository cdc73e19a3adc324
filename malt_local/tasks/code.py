"""The code task: the answer is a Python program, and its reward is running it against tests.

Questions have the HumanEval / MBPP shape: a prompt (a signature and docstring, or prose), test
code, and for HumanEval the entry point that the tests' `check` is called with. The loader makes
the ground truth the test program that follows the answer (`test` + `check(entry_point)`, or
MBPP's asserts), so a stored question is complete on its own.

The answer is the last fenced code block of the output (an unclosed one at a cut-off output
counts), or the whole output when it parses as Python. The program run is the prompt's import
lines (HumanEval prompts import `List` before the signature the model repeats), the answer and
the tests, in `malt_local.tasks.sandbox`: a child process with a time limit, a memory limit, no
network, no writes outside a fresh folder, limited processes and no secrets (docs/sandbox.md
says what it does and does not protect against). Reward 1 when every test passes; the reason
is stored with the node ("passed", "AssertionError", "timed out after 10 s").

Grading takes up to `limits.seconds` per output, so this is a `SlowGrading` task: the tree grades
it in a pool beside generation.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import ClassVar

from malt_local.tasks.base import Grade, QuestionLike, SlowGrading

_FENCE_RE = re.compile(
    r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.S | re.M
)
_IMPORT_RE = re.compile(
    r"^(?:from[ \t]+[\w.]+[ \t]+import[ \t]+[^\n]+|import[ \t]+[\w., \t]+)$", re.M
)
_PYTHON_TAGS = {"", "python", "py", "python3"}
# The sandbox's limits and layers decide outcomes too: part of the task's identity.
GRADER_FILES = [Path(__file__).with_name("sandbox.py")]


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """The program an output states, else None.

    Its last Python code block that defines the entry point (or, without one, any function):
    models follow a solution with a block of example calls, which is not the answer. Without
    such a block the last block; without any block the whole output when it is valid Python.
    """
    blocks = [m.group(2) for m in _FENCE_RE.finditer(text) if m.group(1).lower() in _PYTHON_TAGS]
    blocks = [b for b in blocks if b.strip()]
    if blocks:
        name = re.escape(entry_point) if entry_point else r"\w+"
        pattern = r"^\s*(?:async\s+)?def\s+" + name + r"\s*\("
        defining = [b for b in blocks if re.search(pattern, b, re.M)]
        return (defining or blocks)[-1].rstrip() + "\n"
    stripped = text.strip()
    if not stripped:
        return None
    try:
        ast.parse(stripped)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return stripped + "\n"


def prompt_imports(prompt: str) -> str:
    """The import lines of a prompt that is code (HumanEval's), for the program's head."""
    return "".join(line + "\n" for line in _IMPORT_RE.findall(prompt))


def program(code: str, question: QuestionLike) -> str:
    """What the sandbox runs: the prompt's imports, the answer, then the tests."""
    return f"{prompt_imports(question.text)}\n{code}\n\n{question.ground_truth}\n"


def _entry_point(question: QuestionLike) -> str | None:
    """HumanEval's entry point, which a loaded question keeps in `extra`."""
    extra = getattr(question, "extra", None) or {}
    value = extra.get("entry_point")
    return value if isinstance(value, str) and value.isidentifier() else None


class Code(SlowGrading):
    name = "code"
    version = "1"
    description = "Python code run against the question's tests in a sandbox (HumanEval, MBPP)"
    prompt_variant = "code"

    # Per program: wall-clock seconds and address space; tests of HumanEval's size take well
    # under a second, so 10 s leaves room for a slow machine without letting loops stall a run.
    seconds: ClassVar[float] = 10.0
    memory_mb: ClassVar[int] = 1024

    def extract(self, text: str, question: QuestionLike) -> str | None:
        return extract_code(text, _entry_point(question))

    def cancel(self) -> None:
        from malt_local.tasks.sandbox import cancel_running

        cancel_running()

    def key(self, answer: str | None, question: QuestionLike) -> str | None:
        """Programs equal up to formatting and comments (what voting can group)."""
        if answer is None or not answer.strip():
            return None
        try:
            return ast.unparse(ast.parse(answer))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return " ".join(answer.split())

    def grade(self, text: str, question: QuestionLike) -> Grade:
        from malt_local.tasks.sandbox import Limits, run_program

        try:
            code = extract_code(text, _entry_point(question))
        except Exception:  # a pathological output: no code, not a crash
            code = None
        if code is None:
            return Grade(None, 0, "no code block")
        outcome = run_program(
            program(code, question), Limits(seconds=self.seconds, memory_mb=self.memory_mb)
        )
        return Grade(code, int(outcome.passed), outcome.reason)
