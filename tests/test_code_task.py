"""The code task: answers are programs, graded by running them against the question's tests.

The sandbox itself is tested program by program in tests/test_sandbox.py. Here: extraction,
the HumanEval / MBPP question shapes, grading in the pool beside generation (a resumed run grades
what a killed one left ungraded), rewards both ways through run -> export -> eval with a
scripted OpenAI-compatible server answering known-good, known-bad and hostile code, and a real
run of the small model on HumanEval questions.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from malt_local.questions.loading import load_questions
from malt_local.tasks import get_task
from malt_local.tasks.code import extract_code, program, prompt_imports
from malt_local.tasks.sandbox import run_program
from tests.conftest import TEST_DATA, malt
from tests.openaiserver import FakeOpenAI

HUMANEVAL = TEST_DATA / "humaneval" / "humaneval-20.jsonl"
PROBLEMS = {row["entry_point"]: row for row in map(json.loads, HUMANEVAL.read_text().splitlines())}


def test_extraction_takes_the_last_python_block_or_a_whole_program():
    two = (
        "First try:\n```python\ndef f():\n    return 1\n```\n"
        "Better:\n```py\ndef f():\n    return 2\n```\n"
    )
    assert extract_code(two) == "def f():\n    return 2\n"
    # A cut-off output's unclosed block still counts; other languages' blocks do not.
    assert extract_code("```python\ndef f():\n    return 3") == "def f():\n    return 3\n"
    assert extract_code("```text\nhello\n```\n```bash\nls\n```") is None
    # The solution, not the example calls after it; the entry point's block when there are two.
    usage = "```python\ndef f(x):\n    return x\n```\nUsage:\n```python\nprint(f(2))\n```"
    assert extract_code(usage) == "def f(x):\n    return x\n"
    helper = "```python\ndef g():\n    pass\n```\n```python\ndef h():\n    pass\n```"
    assert extract_code(helper, "g") == "def g():\n    pass\n"
    assert extract_code(helper) == "def h():\n    pass\n"
    assert extract_code("def g(x):\n    return x * 2\n") == "def g(x):\n    return x * 2\n"
    assert extract_code("The answer is to loop over the list.") is None
    assert extract_code("") is None


def test_prompt_imports_head_the_program():
    q = load_questions(HUMANEVAL)[0]
    assert prompt_imports(q.text) == "from typing import List\n"
    source = program("def has_close_elements(numbers, threshold):\n    return False\n", q)
    assert source.startswith("from typing import List\n")
    assert source.rstrip().endswith("check(has_close_elements)")


def test_humaneval_and_mbpp_rows_become_code_questions(tmp_path):
    questions = load_questions(HUMANEVAL)
    assert len(questions) == 20 and {q.task for q in questions} == {"code"}
    q = questions[0]
    assert q.text == PROBLEMS["has_close_elements"]["prompt"].strip()
    assert q.ground_truth.startswith(PROBLEMS["has_close_elements"]["test"].strip()[:40])
    assert q.extra["entry_point"] == "has_close_elements"
    mbpp = tmp_path / "mbpp.jsonl"
    row = {"question": "Write a function add(a, b) that returns a + b.",
           "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}  # fmt: skip
    mbpp.write_text(json.dumps(row) + "\n")
    (m,) = load_questions(mbpp)
    assert m.task == "code"
    assert m.ground_truth == "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
    task = get_task("code")
    good = task.grade("```python\ndef add(a, b):\n    return a + b\n```", m)
    assert (good.correct, good.reason) == (1, "passed")
    bad = task.grade("```python\ndef add(a, b):\n    return a - b\n```", m)
    assert bad.correct == 0 and "AssertionError" in bad.reason
    assert task.grade("I would add them.", m).reason == "no code block"


def test_a_bad_entry_point_is_refused_naming_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "def f(): ...", "test": "def check(c): pass",
                               "entry_point": "f(); import os"}) + "\n")  # fmt: skip
    r = malt("run", "--db", str(tmp_path / "m.db"), str(bad))
    assert r.returncode == 2 and "bad.jsonl:1: entry_point" in r.stderr, r.stderr
    assert not (tmp_path / "m.db").exists()


# --- the whole pipeline against a scripted server ----------------------------------------------


def entry_point_of(body: dict) -> str:
    first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return next(name for name in PROBLEMS if f"def {name}(" in first_user)


def kind_of(seed: int) -> str:
    """Which answer the scripted model gives for a seed: right, wrong, or right but hostile."""
    return ("good", "bad", "hostile")[seed % 3]


def scripted_reply(home_marker: Path):
    def reply(body: dict, index: int) -> str:
        row = PROBLEMS[entry_point_of(body)]
        kind = kind_of(int(body["seed"]) + index)
        if kind == "good":
            code = row["prompt"] + row["canonical_solution"]
        elif kind == "bad":
            code = row["prompt"] + "    return None\n"
        else:  # a right answer that also tries to leave the sandbox: graded 0, nothing written
            code = (
                f"import os\nopen({str(home_marker)!r}, 'w').write(str(dict(os.environ)))\n"
                + row["prompt"] + row["canonical_solution"]
            )  # fmt: skip
        return f"Here is my solution.\n```python\n{code}```\n"

    return reply


def test_rewards_both_ways_through_run_export_and_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("MALT_TEST_SECRET", "s3cr3t-value")
    marker = Path.home() / f"malt-code-task-escape-{os.getpid()}"
    questions = tmp_path / "he.jsonl"
    lines = HUMANEVAL.read_text().splitlines()
    questions.write_text("\n".join(lines[:3]) + "\n")
    db = tmp_path / "m.db"
    with FakeOpenAI(reply=scripted_reply(marker)) as server:
        common = ["--engine", "openai", "--endpoint", server.url, "--model", "fake-model",
                  "--db", str(db), "--max-tokens", "256"]  # fmt: skip
        r = malt("run", "--n", "2", *common, str(questions))
        assert r.returncode == 0, r.stderr
        conn = sqlite3.connect(db)
        conn.row_factory = sqlite3.Row
        nodes = list(conn.execute("SELECT * FROM nodes"))
        assert len(nodes) == 3 * (2 + 4 + 8)
        for n in nodes:
            kind = kind_of(n["seed"])
            assert n["correct"] == (kind == "good"), (kind, n["grade_reason"])
            assert (
                n["grade_reason"] == "passed" if kind == "good" else n["grade_reason"] != "passed"
            )
            if n["depth"] == 3:
                assert n["reward"] == float(kind == "good")
        assert any(kind_of(n["seed"]) == "hostile" for n in nodes)
        assert all(n["value"] is not None and n["label"] is not None for n in nodes)
        assert not marker.exists()

        out = tmp_path / "export"
        r = malt("export", "--db", str(db), "--out", str(out))
        assert r.returncode == 0, r.stderr
        sft = [json.loads(x) for x in (out / "refiner.sft.jsonl").read_text().splitlines()]
        good_leaves = {n["output"] for n in nodes if n["depth"] == 3 and n["reward"] == 1.0}
        assert {row["messages"][-1]["content"] for row in sft} == good_leaves

        r = malt("eval", "--mode", "ma", "--votes", "1", "--samples", "3", "--seeds", "1",
                 "--json", *common, str(questions))  # fmt: skip
        assert r.returncode == 0, r.stderr
        gens = list(conn.execute("SELECT * FROM eval_generations"))
        assert len(gens) == 3 * 3
        for g in gens:
            if g["role"] != "verifier":
                assert g["correct"] == (kind_of(g["seed"]) == "good"), g["grade_reason"]
        report = json.loads(r.stdout)["benchmarks"][0]["accuracy"]
        refined = [g for g in gens if g["role"] == "refiner"]
        assert report["MA"]["mean"] == pytest.approx(100 * sum(g["correct"] for g in refined) / 3)
    assert not marker.exists()


def test_a_killed_runs_ungraded_nodes_are_graded_by_the_next_run(tmp_path):
    """kill -9 between storing a node and grading it leaves `grade_reason` NULL: the next run
    grades those nodes and assigns the credit it could not, generating nothing."""
    questions = tmp_path / "he.jsonl"
    questions.write_text(HUMANEVAL.read_text().splitlines()[3] + "\n")
    db = tmp_path / "m.db"
    with FakeOpenAI(reply=scripted_reply(tmp_path / "never")) as server:
        argv = ["run", "--engine", "openai", "--endpoint", server.url, "--model", "fake-model",
                "--db", str(db), "--n", "2", str(questions)]  # fmt: skip
        assert malt(*argv).returncode == 0
        conn = sqlite3.connect(db)
        before = conn.execute("SELECT id, correct, reward, value, label FROM nodes").fetchall()
        with conn:  # the state a kill -9 before the pool finished leaves
            conn.execute("UPDATE nodes SET correct = NULL, reward = NULL, value = NULL, "
                         "label = NULL, grade_reason = NULL WHERE depth >= 2")  # fmt: skip
        requests = len(server.chats)
        r = malt(*argv)
        assert r.returncode == 0, r.stderr
        assert len(server.chats) == requests  # nothing generated again
        after = conn.execute("SELECT id, correct, reward, value, label FROM nodes").fetchall()
        assert sorted(after) == sorted(before)
        left = conn.execute("SELECT COUNT(*) FROM nodes WHERE grade_reason IS NULL").fetchone()
        assert left == (0,)

        # The same for an evaluation.
        i = argv.index("--n")
        argv[i : i + 2] = []
        argv[:1] = ["eval", "--mode", "ma", "--votes", "2", "--seeds", "1"]
        assert malt(*argv).returncode == 0
        query = "SELECT id, answer, correct, grade_reason FROM eval_generations"
        before = conn.execute(query).fetchall()
        assert len(before) == 6 and all(g[3] for g in before)
        with conn:
            conn.execute("UPDATE eval_generations SET correct = NULL, grade_reason = NULL")
        requests = len(server.chats)
        r = malt(*argv)
        assert r.returncode == 0, r.stderr
        assert len(server.chats) == requests
        assert sorted(conn.execute(query).fetchall()) == sorted(before)


# --- the real model --------------------------------------------------------------------------


def test_a_real_run_of_the_code_task_on_humaneval(tmp_path, small_model):
    questions = tmp_path / "he.jsonl"
    questions.write_text("\n".join(HUMANEVAL.read_text().splitlines()[:2]) + "\n")
    db = tmp_path / "m.db"
    r = malt("run", "--n", "2", "--max-tokens", "64", "--model", str(small_model),
             "--db", str(db), str(questions))  # fmt: skip
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    nodes = list(conn.execute("SELECT * FROM nodes"))
    assert len(nodes) == 2 * (2 + 4 + 8)
    qs = {q.id: q for q in load_questions(questions)}
    for n in nodes:
        assert n["grade_reason"] is not None
        code = extract_code(n["output"], qs[n["question_id"]].extra["entry_point"])
        if code is None:
            assert (n["answer"], n["grade_reason"]) == (None, "no code block")
            continue
        again = run_program(program(code, qs[n["question_id"]]))
        assert n["correct"] == int(again.passed) and n["grade_reason"] == again.reason
    assert all(n["reward"] in (0.0, 1.0) for n in nodes if n["depth"] == 3)
    assert all(n["value"] is not None for n in nodes)


def test_mbpp_and_humaneval_rows_from_the_hub_become_code_questions():
    """The Hub datasets' columns, through their default mapping (`hf:` sources), are graded by
    the code task: a right answer passes, a wrong one does not."""
    from malt_local.datasets.fields import defaults_for, map_row
    from malt_local.questions.loading import questions_from_rows

    mbpp = {"task_id": 2, "text": "Write a function to find the shared elements of two lists.",
            "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
            "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == {4, 5}"],
            "test_setup_code": "", "challenge_test_list": []}  # fmt: skip
    he = PROBLEMS["has_close_elements"]
    rows = [
        ("hf:mbpp:test", 1, map_row(mbpp, defaults_for("mbpp"))),
        ("hf:openai_humaneval:test", 1, map_row(he, defaults_for("openai_humaneval"))),
    ]
    m, h = questions_from_rows(rows, None, "hub rows")
    assert (m.task, h.task) == ("code", "code")
    task = get_task("code")
    assert task.grade(f"```python\n{mbpp['code']}\n```", m).correct == 1
    assert task.grade("```python\ndef similar_elements(a, b):\n    return ()\n```", m).correct == 0
    right = f"```python\n{he['prompt']}{he['canonical_solution']}```"
    assert task.grade(right, h).reason == "passed"


# --- hostile answers in a run ----------------------------------------------------------------

FAST_CODE = '''
from malt_local.tasks.code import Code


class FastCode(Code):
    """The code task with a 3 s limit, so a test's endless loops end soon."""

    name = "fastcode"
    seconds = 3.0
'''


def hostile_programs(marker: Path, sentinel: Path, port: int, tag: str) -> dict[str, str]:
    """Each hostile answer, as the body of the entry point's module (the tests then fail)."""
    return {
        "loop": "while True:\n    pass\n",
        "fork": "import os\nwhile True:\n    os.fork()\n",
        "alloc": "b = bytearray(10 * 2**30)\n",
        "home": f"open({str(marker)!r}, 'w').write('escaped')\n",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port})).send(b'x')\n",
        "delete": f"import os, shutil\nos.remove({str(sentinel)!r})\n"
        f"shutil.rmtree({str(sentinel.parent)!r})\n",
        "environ": "import os\nprint(dict(os.environ))\nraise SystemExit(str(dict(os.environ)))\n",
        "print": "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)\n",
    } | {"tag": f"# {tag}\n"}


def test_hostile_answers_are_graded_0_and_nothing_escapes(tmp_path, monkeypatch):
    import itertools
    import socket
    import threading

    monkeypatch.setenv("MALT_TEST_SECRET", "s3cr3t-hostile")
    tag = f"malt-hostile-{os.getpid()}-{tmp_path.name}"
    marker = Path.home() / f"{tag}-escaped"
    keep = tmp_path / "keep"
    keep.mkdir()
    sentinel = keep / "sentinel.txt"
    sentinel.write_text("still here")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list = []

    def watch() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                continue

    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    programs = hostile_programs(marker, sentinel, listener.getsockname()[1], tag)
    kinds = itertools.cycle([k for k in programs if k != "tag"])
    said: dict[str, str] = {}

    def reply(body: dict, index: int) -> str:
        kind = next(kinds)
        text = f"```python\n{programs['tag']}# kind: {kind}\n{programs[kind]}```\n"
        said[text] = kind
        return text

    (tmp_path / "fastcode_task.py").write_text(FAST_CODE)
    (tmp_path / "he.jsonl").write_text(HUMANEVAL.read_text().splitlines()[2] + "\n")
    try:
        with FakeOpenAI(reply=reply) as server:
            r = malt("run", "--engine", "openai", "--endpoint", server.url, "--model", "fake-model",
                     "--task", "fastcode_task:FastCode", "--n", "2", "--db", "m.db", "he.jsonl",
                     cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        watcher.join()
        listener.close()
    conn = sqlite3.connect(tmp_path / "m.db")
    rows = conn.execute("SELECT output, correct, reward, grade_reason, depth FROM nodes").fetchall()
    assert len(rows) == 14
    reasons: dict[str, set[str]] = {}
    for output, correct, reward, reason, depth in rows:
        assert correct == 0 and (depth < 3 or reward == 0.0), (said[output], reason)
        reasons.setdefault(said[output], set()).add(reason)
        assert "s3cr3t-hostile" not in reason
    assert set(reasons) == set(programs) - {"tag"}  # every kind was answered and graded
    assert reasons["loop"] == {"timed out after 3 s"}
    assert all("fork" in r for r in reasons["fork"]), reasons["fork"]
    assert all("not allowed" in r for r in reasons["home"] | reasons["delete"])
    assert reasons["alloc"] == {"memory limit (1024 MB)"}
    assert all(r.startswith("output over") for r in reasons["print"]), reasons["print"]
    # Nothing escaped: no file in $HOME, the sentinel and its folder intact, no connection, and
    # no process of the sandbox left (each program carries the tag in its source).
    assert not marker.exists()
    assert sentinel.read_text() == "still here"
    assert accepted == []
    assert conn.execute("SELECT COUNT(*) FROM nodes WHERE value IS NULL").fetchone() == (0,)
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if tag.encode() in (proc / "cmdline").read_bytes():
                left.append(proc.name)
        except OSError:
            continue
    assert left == []


PATIENT_CODE = '''
from malt_local.tasks.code import Code


class Patient(Code):
    """The code task with a 120 s limit: an interrupted run must not wait for it."""

    name = "patientcode"
    seconds = 120.0
'''


def test_ctrl_c_while_grading_stops_at_once_and_the_next_run_grades_the_rest(tmp_path):
    """Programs still running when Ctrl-C comes are stopped (not waited for, up to 120 s each),
    their nodes stay ungraded, and the next run grades them."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import uuid

    from tests.conftest import default_signals

    tag = f"malt-sigint-{uuid.uuid4().hex}"
    flag = Path("/tmp") / tag  # world-readable: the program, as its own user, can see it
    flag.touch()
    flag.chmod(0o644)
    row = PROBLEMS["has_close_elements"]
    # Right code that spins while the flag exists: the first run's gradings never end by
    # themselves; once the flag is gone the same stored answers pass.
    code = f"import os\nwhile os.path.exists({str(flag)!r}):\n    pass\n" + row["prompt"]
    code += row["canonical_solution"]
    (tmp_path / "patient_task.py").write_text(PATIENT_CODE)
    (tmp_path / "he.jsonl").write_text(HUMANEVAL.read_text().splitlines()[0] + "\n")
    db = tmp_path / "m.db"
    try:
        with FakeOpenAI(reply=lambda body, i: f"```python\n{code}```\n") as server:
            argv = [sys.executable, "-m", "malt_local", "run", "--engine", "openai",
                    "--endpoint", server.url, "--model", "fake-model", "--task",
                    "patient_task:Patient", "--n", "2", "--db", str(db), "he.jsonl"]  # fmt: skip
            p = subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=default_signals)  # fmt: skip
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.1)
                if db.exists():
                    with contextlib.suppress(sqlite3.Error), sqlite3.connect(db) as c:
                        if c.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] >= 3:
                            break
            # The sandboxes grading this run's answers now (their programs carry the tag).
            ours = [f for f in Path(tempfile.gettempdir()).glob("malt-sandbox-*") if _ours(f, tag)]
            assert ours, "no grading in flight when interrupted"
            interrupted = time.monotonic()
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=120)
            waited = time.monotonic() - interrupted
            assert p.returncode == 130, err
            assert waited < 60, f"exit took {waited:.1f} s: the run waited for its programs"
            conn = sqlite3.connect(db)
            pending = conn.execute("SELECT COUNT(*) FROM nodes WHERE grade_reason IS NULL")
            assert pending.fetchone()[0] >= 1
            # Every process of those sandboxes is gone, and so are their folders.
            names = [f.name for f in ours]
            left = [p.name for p in Path("/proc").glob("[0-9]*") if _has(p, names)]
            assert left == []
            assert not any(f.exists() for f in ours)

            flag.unlink()
            r = malt(*argv[3:], cwd=tmp_path)
            assert r.returncode == 0, r.stderr
        rows = conn.execute("SELECT correct, grade_reason FROM nodes").fetchall()
        assert len(rows) == 14 and set(rows) == {(1, "passed")}
    finally:
        flag.unlink(missing_ok=True)


def _ours(folder: Path, tag: str) -> bool:
    try:
        return tag in (folder / "program.py").read_text()
    except OSError:
        return False


def _has(proc: Path, names: list[str]) -> bool:
    """Whether a process runs in (or names) one of the sandbox folders."""
    try:
        cmdline = (proc / "cmdline").read_bytes()
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return False
    return any(n.encode() in cmdline or n in cwd for n in names)
