"""Questions in: `.jsonl`, `.json`, `.csv`, `.tsv`, `.txt` and `.parquet`, in the shapes the
benchmarks ship (`malt_local.questions.formats` reads the files as the tools that write them do).

The shape of a row decides the task (and so the grader): GSM8K rows have an `answer` ending in
`#### N`, MATH rows a `problem` and an `answer` or a `\\boxed{}` solution, CSQA rows `options`
and a letter, code rows (HumanEval, MBPP) a `test` (or MBPP's `test_list`). Anything else with
`question` and `answer`/`ground_truth` is graded by exact match; `--task` names any other task.
A question's id is a hash of its content, so re-running a grown file only adds the new rows.
A question and its ground truth are the field's text as written, less leading and trailing
whitespace (a cell's trailing line break is not part of the question, and ids ignore it too).

`.txt`: one question per line, the ground truth after a TAB; blank lines and lines starting
with `#` are skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.grading import last_boxed
from malt_local.questions.formats import read_rows
from malt_local.tasks import check_task, get_task
from malt_local.tasks.code import Code

# "judge" is never detected: `--task judge` asks for the LLM judge (free-form answers).
_OPTION_LINE = re.compile(r"^\s*\(?([A-Ja-j])[.):]\s*(.+?)\s*$")


@dataclass(frozen=True)
class Question:
    """One question with its normalised ground truth and the task that grades it."""

    text: str
    ground_truth: str
    task: str
    options: tuple[tuple[str, str], ...] = ()
    source: str = ""
    line: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        return question_id(self.text, self.ground_truth, self.options)


def question_id(text: str, ground_truth: str, options: tuple[tuple[str, str], ...] = ()) -> str:
    """Stable id from the content only (not the file or line), so files can grow and move."""
    payload = json.dumps([text.strip(), ground_truth.strip(), [list(o) for o in options]])
    return "q" + hashlib.sha256(payload.encode()).hexdigest()[:12]


# (row, "file:line") -> the row with malt's field names
RowMap = Callable[[dict, str], dict]


def load_questions(
    path: str | Path, task: str | None = None, map_row: RowMap | None = None
) -> list[Question]:
    """Read and validate every row; any bad row is a `MaltError` naming the line. `map_row`
    renames a row's columns first (`--question-field`...: `malt_local.datasets.fields`)."""
    p = Path(path)
    check_task(task)
    if not p.exists():
        raise MaltError(f"questions file not found: {p}")
    if p.is_dir():
        raise MaltError(f"questions path is a folder, not a file: {p}")
    rows = ((str(p), line, row) for line, row in read_rows(p))
    return questions_from_rows(rows, task, str(p), map_row)


def questions_from_rows(
    rows: Iterable[tuple[str, int, dict]],
    task: str | None,
    what: str,
    map_row: RowMap | None = None,
) -> list[Question]:
    """Questions from (source, line, row) triples, however they were read (a file, the shards
    of a Hub dataset's split); `what` names them all when there are none."""
    check_task(task)
    questions = [
        _to_question(map_row(row, f"{source}:{line}") if map_row else row, line, task, source)
        for source, line, row in rows
    ]
    if not questions:
        raise MaltError(f"no questions in {what}")
    # The same question twice is one tree: ids are content hashes.
    unique: dict[str, Question] = {}
    for q in questions:
        unique.setdefault(q.id, q)
    return list(unique.values())


def detect_task(row: dict) -> str:
    """The task a row's shape implies."""
    if row.get("test") or row.get("test_list"):
        return "code"
    if row.get("options") or row.get("choices"):
        return "csqa"
    if "problem" in row:
        return "math"
    answer = str(row.get("answer", ""))
    if "####" in answer:
        return "gsm8k"
    if "\\boxed" in str(row.get("solution", "")):
        return "math"
    return "exact"


def _to_question(row: dict, line: int, forced: str | None, source: str) -> Question:
    where = f"{source}:{line}"
    text = str(row.get("question") or row.get("problem") or row.get("prompt") or "").strip()
    if not text:
        raise MaltError(f"{where}: no question (expected a 'question' or 'problem' field)")
    shape = detect_task(row)
    task = forced or shape
    options = _parse_options(row.get("options") or row.get("choices"), where)
    # A code task (the built-in or a subclass of it) reads the row's tests as its ground truth.
    code = isinstance(get_task(task), Code)
    truth = _code_tests(row, where) if code else _ground_truth(row, shape, task, where)
    if task == "csqa":
        if not options:
            raise MaltError(f"{where}: task csqa needs 'options'")
        truth = _csqa_letter(truth, options, where)
    keep = ("subject", "level", "unique_id", "id", "task_id", "entry_point")
    extra = {k: v for k, v in row.items() if k in keep}
    return Question(text, truth, task, options, source, line, extra)


def _code_tests(row: dict, where: str) -> str:
    """A code question's ground truth: the test program run after the answer.

    HumanEval ships `test` defining `check(candidate)` and the `entry_point` to call it with;
    MBPP ships `test_list`, asserts that call the function by name (and `test_setup_code`).
    """
    tests = row.get("test") or row.get("test_list")
    if isinstance(tests, (list, tuple)):
        tests = "\n".join(str(t) for t in tests)
    if not isinstance(tests, str) or not tests.strip():
        raise MaltError(f"{where}: task code needs 'test' (test code or a list of asserts)")
    setup = str(row.get("test_setup_code") or "").strip()
    program = (setup + "\n\n" if setup else "") + tests.strip() + "\n"
    entry = str(row.get("entry_point") or "").strip()
    if entry:
        if not entry.isidentifier():
            raise MaltError(f"{where}: entry_point {entry!r} is not a Python name")
        if "def check" in tests:
            program += f"\n\ncheck({entry})\n"
    return program


def _ground_truth(row: dict, shape: str, task: str, where: str) -> str:
    # answerKey: CommonsenseQA as the Hub ships it (choices {label, text} and a letter).
    for key in ("ground_truth", "answer", "answerKey", "target", "label"):
        value = row.get(key)
        if value is not None and str(value).strip():
            answer = str(value).strip()
            break
    else:
        answer = ""
    if not answer and "\\boxed" in str(row.get("solution", "")):
        answer = (last_boxed(str(row["solution"])) or "").strip()
    if not answer:
        raise MaltError(f"{where}: missing ground truth (expected 'answer' or 'ground_truth')")
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip()
        answer = answer.replace(",", "")
    return answer


def _parse_options(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    if isinstance(value, dict):
        # {"label": [...], "text": [...]} (HF CommonsenseQA) or {"A": "...", ...}
        if "label" in value and "text" in value:
            return tuple(zip(map(str, value["label"]), map(str, value["text"]), strict=False))
        return tuple((str(k).upper(), str(v)) for k, v in value.items())
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            m = _OPTION_LINE.match(str(item))
            out.append((m.group(1).upper(), m.group(2)) if m else (chr(65 + i), str(item)))
        return tuple(out)
    # "\nA. bank\nB. library": lines before the first option are noise (real CSQA rows
    # have a stray "."), a line that is not an option continues the previous one.
    out: list[tuple[str, str]] = []
    for ln in (ln.strip() for ln in str(value).splitlines()):
        m = _OPTION_LINE.match(ln)
        if m:
            out.append((m.group(1).upper(), m.group(2)))
        elif ln and out:
            out[-1] = (out[-1][0], f"{out[-1][1]} {ln}")
    if not out:
        raise MaltError(f"{where}: cannot read the options (expected lines like 'A. text')")
    return tuple(out)


def _csqa_letter(truth: str, options: tuple[tuple[str, str], ...], where: str) -> str:
    m = _OPTION_LINE.match(truth)
    letter = m.group(1).upper() if m else truth.strip().strip("().").upper()
    letters = {lt for lt, _ in options}
    if letter in letters:
        return letter
    for lt, text in options:
        if text.strip().lower() == truth.strip().lower():
            return lt
    raise MaltError(f"{where}: ground truth {truth!r} is not one of the options")
