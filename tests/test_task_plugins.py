"""Tasks as plugins: a package installed into the venv registers a task through the
`malt.tasks` entry point group, and malt runs, exports and evaluates a tree with it; a
`module:NAME` task needs no package; a task's identity is part of its run's.

The plugin is tests/plugins/malt-task-tolerance (the docs' example, numbers within 1%),
installed with pip from a copy of its folder (pip writes build files next to the source) and
uninstalled afterwards, whatever the tests did.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from malt_local.tasks import get_task
from malt_local.tasks.base import Grade
from tests.conftest import malt

PLUGIN = Path(__file__).parent / "plugins" / "malt-task-tolerance"

QUESTIONS = [
    {"question": "What is 3 + 5? Answer with the number.", "answer": "8"},
    {"question": "What is 10 - 4? Answer with the number.", "answer": "6"},
]


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin") / "malt-task-tolerance"
    shutil.copytree(PLUGIN, folder)
    r = pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(folder))
    assert r.returncode == 0, r.stderr
    importlib.invalidate_caches()
    try:
        yield folder
    finally:
        r = pip("uninstall", "-y", "malt-task-tolerance")
        assert r.returncode == 0, r.stderr


def write_questions(path: Path) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def tolerance_grade(text: str, truth: str) -> tuple[str | None, int]:
    """The plugin's rule, written out again: the last number, within 1%."""
    import re

    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    if not numbers:
        return None, 0
    x, y = float(numbers[-1]), float(truth)
    return numbers[-1], int(abs(x - y) <= 0.01 * max(abs(x), abs(y)))


def test_the_plugin_is_listed_with_its_source(installed_plugin):
    r = malt("tasks", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["gsm8k"]["source"] == "built-in"
    assert rows["code"]["source"] == "built-in"
    tol = rows["tolerance"]
    assert tol["source"] == "malt-task-tolerance 0.1 (malt_task_tolerance:Tolerance)"
    assert tol["identity"].startswith("tolerance@1:")
    assert tol["description"] == "a number within 1% of the ground truth"
    assert rows["broken"]["description"].startswith("broken: task plugin 'broken'")


def test_a_broken_plugin_is_one_line_exit_2(installed_plugin, tmp_path, small_model):
    questions = write_questions(tmp_path / "q.jsonl")
    db = tmp_path / "m.db"
    argv = ["run", "--task", "broken", "--model", str(small_model), "--db", str(db)]
    r = malt(*argv, str(questions))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "task plugin 'broken'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not db.exists()


def test_run_export_eval_with_the_plugin_task(installed_plugin, tmp_path, small_model):
    questions = write_questions(tmp_path / "q.jsonl")
    db = tmp_path / "m.db"
    common = ["--model", str(small_model), "--db", str(db), "--max-tokens", "24"]
    r = malt("run", "--task", "tolerance", "--n", "2", *common, str(questions))
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    (config,) = conn.execute("SELECT config FROM runs").fetchone()
    expected = get_task_identity_in_subprocess("tolerance")
    assert json.loads(config)["tasks"] == {"tolerance": expected}
    truths = {r["id"]: r["ground_truth"] for r in conn.execute("SELECT * FROM questions")}
    nodes = list(conn.execute("SELECT * FROM nodes"))
    assert len(nodes) == 2 * (2 + 4 + 8)
    leaves = [n for n in nodes if n["depth"] == 3]
    for n in leaves:
        answer, correct = tolerance_grade(n["output"], truths[n["question_id"]])
        assert (n["answer"], n["correct"], n["reward"]) == (answer, correct, float(correct))
    assert all(n["value"] is not None for n in nodes)  # credit was assigned

    out = tmp_path / "export"
    r = malt("export", "--db", str(db), "--out", str(out), "--keep-length-stopped")
    assert r.returncode == 0, r.stderr
    lines = (out / "refiner.sft.jsonl").read_text().splitlines()
    positives = {json.loads(line)["messages"][-1]["content"] for line in lines}
    assert positives == {n["output"] for n in leaves if n["reward"] == 1.0}

    r = malt("eval", "--task", "tolerance", "--mode", "sa", "--votes", "1", "--samples", "2",
             "--seeds", "1", *common, "--json", str(questions))  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    gens = list(conn.execute("SELECT * FROM eval_generations"))
    assert len(gens) == 2
    for g in gens:
        qid = g["question_id"]
        assert (g["answer"], g["correct"]) == tolerance_grade(g["output"], truths[qid])
    sa = report["benchmarks"][0]["accuracy"]["SA"]["mean"]
    assert sa == pytest.approx(100 * sum(g["correct"] for g in gens) / 2)


def get_task_identity_in_subprocess(name: str) -> str:
    r = malt("tasks", "--json")
    assert r.returncode == 0, r.stderr
    return next(row["identity"] for row in json.loads(r.stdout) if row["name"] == name)


MODULE_TASK = '''
from malt_local.tasks import Task


class Last(Task):
    """The last word of the output, case-insensitively."""

    name = "lastword"

    def extract(self, text, question):
        words = text.split()
        return words[-1].strip(".!?") if words else None
'''


def test_a_module_task_from_the_current_folder_and_a_changed_grader_is_refused(
    tmp_path, small_model
):
    (tmp_path / "mytask.py").write_text(MODULE_TASK)
    questions = write_questions(tmp_path / "q.jsonl")
    argv = ["run", "--task", "mytask:Last", "--n", "1", "--max-tokens", "8",
            "--model", str(small_model), "--db", "m.db", "q.jsonl"]  # fmt: skip
    r = malt(*argv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(tmp_path / "m.db")
    (config,) = conn.execute("SELECT config FROM runs").fetchone()
    tasks = json.loads(config)["tasks"]
    assert list(tasks) == ["mytask:Last"] and tasks["mytask:Last"].startswith("lastword@1:")
    for output, answer in conn.execute("SELECT output, answer FROM nodes WHERE depth = 3"):
        words = output.split()
        assert answer == (words[-1].strip(".!?") if words else None)
    assert questions.exists()

    # The same grader: the resume has nothing to do.
    r = malt(*argv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    # A changed grader: the stored rewards were given by the old one, so the resume is refused.
    (tmp_path / "mytask.py").write_text(MODULE_TASK.replace("[-1]", "[0]"))
    r = malt(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "task grader" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = malt(*argv, "--new-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert conn.execute("SELECT COUNT(*) FROM runs").fetchone() == (2,)


def test_unknown_and_malformed_task_names_are_one_line(tmp_path):
    for value, message in (
        ("nope", "unknown task 'nope'"),
        ("no_such_module:X", "cannot import no_such_module"),
        ("json:dumps", "is not a malt task"),
    ):
        r = malt("run", "--task", value, "--db", str(tmp_path / "m.db"), "x.jsonl", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, (value, r.stderr)
        assert r.stderr.count("\n") == 1


def test_task_defaults_and_a_failing_plugin_grader():
    """The base class's exact-match defaults, and a grader that raises grades 0, not a crash."""
    from malt_local.tasks import Task

    class Raises(Task):
        name = "raises"

        def equal(self, a, b, question):
            raise ZeroDivisionError

    class Q:
        text, ground_truth, options = "q", "Paris", ()

    plain = get_task("exact")
    assert plain.grade("Thinking...\nFinal Answer: paris.", Q()) == Grade("paris", 1)
    assert Task().grade("Final Answer: **Paris**", Q()).correct == 1
    assert Raises().grade("Final Answer: Paris", Q()) == Grade(
        "Paris", 0, "comparison failed: ZeroDivisionError"
    )
