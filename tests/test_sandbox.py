"""The sandbox for model-written code (malt_local/tasks/sandbox.py, docs/sandbox.md).

Every test starts real child processes. A hostile program is written so that it would exit 0
if its attack worked; each test then checks the attack's effect from outside (the file is
there, the listener got a connection, a process is left) rather than trusting the reason.

Most hostile tests run twice: `hook` through `run_program`, where the reason must be the audit
hook's refusal, and `os-only` with the audit hook switched off, where the operating-system
layers (user id, read-only mounts, namespaces, rlimits) must stop the attack on their own. An
`os-only` case is skipped, with the missing layer named, on a machine that grants no such layer
(a normal user without user namespaces); CI runs as root, where they all run.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from malt_local.tasks import sandbox
from malt_local.tasks.sandbox import Limits, Outcome, isolation, run_program
from tests.conftest import TEST_DATA

HUMANEVAL = TEST_DATA / "humaneval" / "humaneval-20.jsonl"


def run(source: str, mode: str = "hook", **limits) -> Outcome:
    """Run `source` with small limits; `os-only` without the audit hook."""
    chosen = Limits(**{"seconds": 3, **limits})
    if mode == "hook":
        return run_program(source, chosen)
    return sandbox._run(source, chosen, audit_hook=False)


def privileged() -> bool:
    """Root with CAP_SYS_ADMIN (CI, a root container): every OS layer must be there."""
    status = Path("/proc/self/status").read_text()
    caps = int(
        next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
    )
    return os.geteuid() == 0 and bool(caps & (1 << 21))


def needs(*layers: str):
    """Skip an os-only case where this machine grants none of `layers` (prefixes); where it
    should grant them all (privileged), a missing layer fails instead, so that a layer the
    code stopped setting up cannot hide behind a skip."""
    active = isolation()
    if not any(a == layer or a.startswith(layer + ":") for layer in layers for a in active):
        message = f"no {' or '.join(layers)} layer here (active: {', '.join(active)})"
        if privileged():
            pytest.fail(message)
        pytest.skip(message)


BOTH = pytest.mark.parametrize("mode", ["hook", "os-only"])


def refused(outcome: Outcome, mode: str) -> None:
    """The run failed, and for `hook` because the audit hook said no."""
    assert not outcome.passed, outcome
    if mode == "hook":
        assert "sandbox:" in outcome.reason, outcome
    else:
        assert "sandbox:" not in outcome.reason, outcome


# -- what is left behind ------------------------------------------------------------------------


def processes_of(outcome: Outcome) -> list[int]:
    """Live processes of a run: MALT_SANDBOX=<its id> in their environment, or its user id
    (a program may clear its environment) unless they carry another run's MALT_SANDBOX (the
    id may have gone to a run of another process on this machine since)."""
    marker = f"MALT_SANDBOX={outcome.sandbox_id}".encode()
    uid = next((int(a.split(":")[1]) for a in outcome.isolation if a.startswith("uid:")), None)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            if stat.rsplit(b")", 1)[1].split()[0] == b"Z":
                continue  # a zombie runs nothing; its parent's parent reaps it
            status = Path(f"/proc/{entry.name}/status").read_text()
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        real_uid = int(
            next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
        )
        variables = environ.split(b"\0")
        other = any(v.startswith(b"MALT_SANDBOX=") and v != marker for v in variables)
        if marker in variables or (uid is not None and real_uid == uid and not other):
            found.append(int(entry.name))
    return found


def assert_nothing_left(outcome: Outcome) -> None:
    assert outcome.sandbox_id
    deadline = time.monotonic() + 3  # SIGKILL has been sent; give the kernel a moment
    while processes_of(outcome) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(outcome) == []


SYSTEM_TMP = Path(tempfile.gettempdir())


@pytest.fixture(autouse=True)
def no_folder_left(monkeypatch):
    """Each test's runs make their folders in a temp dir of the test's own (other processes
    on the machine may be running the sandbox too), which must be empty afterwards. It is
    open to other users (0711), as the system temp dir is: the run's user id must reach it."""
    parent = Path(tempfile.mkdtemp(prefix="malt-sbx-tests-", dir=SYSTEM_TMP))
    parent.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(parent))
    try:
        yield parent
        assert [p.name for p in parent.iterdir()] == []
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def unsandboxed(source: str) -> subprocess.CompletedProcess[str]:
    """The control: the same program with the caller's environment and no sandbox."""
    return subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=30,
        env=os.environ.copy(),
    )


# -- ordinary programs --------------------------------------------------------------------------

SQUARE = "def square(x):\n    return x * x\n"
TESTS = "assert square(3) == 9\nassert square(-2) == 4\n"


def test_a_correct_function_passes():
    outcome = run(SQUARE + TESTS)
    assert outcome.passed and outcome.reason == "passed", outcome
    assert 0 < outcome.seconds < 3
    assert_nothing_left(outcome)


def test_a_wrong_function_fails_with_its_assertion():
    outcome = run("def square(x):\n    return x + x\n" + "assert square(3) == 9, 'square(3)'\n")
    assert not outcome.passed
    assert outcome.reason == "AssertionError: square(3)"
    assert "Traceback" in outcome.output


def test_a_syntax_error_is_the_reason():
    outcome = run("def square(x:\n    return x\n")
    assert not outcome.passed
    assert outcome.reason.startswith("SyntaxError"), outcome


def test_an_exit_status_is_the_reason():
    outcome = run("print('done')\nraise SystemExit(3)\n")
    assert (outcome.passed, outcome.reason, outcome.output) == (False, "exit 3", "done\n")


ODD_SOURCES = {
    "lone surrogate": ("x = '\udc80'\nassert x == '\udc80'\n", True),  # written as "?"
    "NUL byte": ("print(1)\0\n", False),
    "empty": ("", True),
}


@pytest.mark.parametrize("name", ODD_SOURCES)
def test_odd_sources_are_outcomes_not_errors(name):
    source, passes = ODD_SOURCES[name]
    outcome = run(source)
    assert outcome.passed == passes, outcome
    assert outcome.reason


def test_the_standard_library_is_there():
    outcome = run(
        "import math, re, collections, itertools, functools, heapq, typing, hashlib\n"
        "from typing import List\nassert math.gcd(12, 18) == 6\n"
    )
    assert outcome.passed, outcome


def test_isolation_names_the_layers():
    layers = isolation()
    assert {"session", "minimal-env", "rlimits", "audit-hook"} <= set(layers)
    if privileged():  # CI: root, where every layer must be there
        assert any(a.startswith("uid:") for a in layers), layers
        assert {"nproc", "mountns", "readonly-fs", "netns", "pidns"} <= set(layers), layers


# -- hostile programs ---------------------------------------------------------------------------


def test_an_endless_loop_times_out():
    outcome = run("while True:\n    pass\n", seconds=2)
    assert not outcome.passed
    assert outcome.reason == "timed out after 2 s"
    assert 2 <= outcome.seconds < 4
    assert_nothing_left(outcome)


FORK_BOMBS = {
    "os.fork": "import os\nwhile True:\n    os.fork()\n",
    "subprocess": textwrap.dedent("""\
        import subprocess, sys
        while True:
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        """),
}


@pytest.mark.parametrize("bomb", FORK_BOMBS)
def test_a_fork_bomb_is_refused(bomb):
    outcome = run(FORK_BOMBS[bomb])
    refused(outcome, "hook")
    assert_nothing_left(outcome)


@pytest.mark.parametrize("bomb", FORK_BOMBS)
def test_a_fork_bomb_stops_at_the_process_limit_without_the_hook(bomb):
    # The hook would refuse the first fork; without it RLIMIT_NPROC (counting this run alone:
    # an own user id, or a user namespace) must hold, and the children it did start (sleeping
    # for a minute) must be gone afterwards.
    needs("nproc")
    outcome = run(FORK_BOMBS[bomb], "os-only", processes=4)
    refused(outcome, "os-only")
    assert "Resource temporarily unavailable" in outcome.reason, outcome
    assert outcome.seconds < 3
    assert_nothing_left(outcome)


def test_a_daemonised_child_is_killed_after_a_pass():
    daemon = textwrap.dedent("""\
        import os, time
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        os.waitpid(child, 0)
        """)
    outcome = run(daemon, processes=2)
    assert outcome.passed, outcome
    assert_nothing_left(outcome)


def test_ten_gigabytes_hit_the_memory_limit():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = run("b = bytearray(10 * 2**30)\nprint(len(b))\n", memory_mb=512)
    assert not outcome.passed
    assert outcome.reason == "memory limit (512 MB)"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB
    assert_nothing_left(outcome)


def test_a_large_file_hits_the_file_size_limit():
    outcome = run("open('big', 'wb').write(b'x' * 2_000_000)\n", file_bytes=1_000_000)
    assert not outcome.passed
    assert outcome.reason == "file size limit (1 MB)"


@BOTH
def test_writing_the_callers_home_is_refused(mode):
    if mode == "os-only":
        needs("uid", "readonly-fs")
    target = Path.home() / f"malt-sandbox-probe-{uuid.uuid4().hex}"
    try:
        outcome = run(f"open({str(target)!r}, 'w').write('escaped')\n", mode)
        refused(outcome, mode)
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@BOTH
@pytest.mark.parametrize("where", ["tmp_path", "tempdir"])
def test_writing_outside_the_sandbox_folder_is_refused(mode, where, tmp_path):
    if mode == "os-only":
        needs("readonly-fs")  # /tmp itself is writable for every user id
    folder = tmp_path if where == "tmp_path" else SYSTEM_TMP
    target = folder / f"malt-escape-{uuid.uuid4().hex}"
    program = f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n"
    try:
        assert unsandboxed(program).returncode == 0 and target.exists()  # the control
        target.unlink()
        outcome = run(program, mode)
        refused(outcome, mode)
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@BOTH
def test_a_socket_to_localhost_gets_no_connection(mode):
    if mode == "os-only":
        needs("netns")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        program = textwrap.dedent(f"""\
            import socket
            s = socket.socket()
            s.settimeout(2)
            s.connect(("127.0.0.1", {port}))
            s.sendall(b"escaped")
            """)
        control = unsandboxed(program)
        assert control.returncode == 0, control.stderr
        assert select.select([listener], [], [], 5)[0], "the control did not connect"
        listener.accept()[0].close()

        outcome = run(program, mode)
        refused(outcome, mode)
        assert select.select([listener], [], [], 0.5)[0] == [], "the sandbox connected"


DELETIONS = {
    "os.remove": "import os\nos.remove({file!r})\n",
    "shutil.rmtree": "import shutil\nshutil.rmtree({folder!r})\n",
    "os.rename": "import os\nos.rename({file!r}, {file!r} + '.moved')\n",
}


@BOTH
@pytest.mark.parametrize("how", DELETIONS)
def test_deleting_files_outside_is_refused(mode, how, tmp_path):
    if mode == "os-only":
        needs("uid", "readonly-fs")
    file = tmp_path / "sentinel.txt"
    file.write_text("keep me")
    folder = tmp_path / "folder"
    (folder / "inside").mkdir(parents=True)
    (folder / "inside" / "data.txt").write_text("keep me too")
    outcome = run(DELETIONS[how].format(file=str(file), folder=str(folder)), mode)
    refused(outcome, mode)
    assert file.read_text() == "keep me"
    assert (folder / "inside" / "data.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "sentinel.txt"]


@BOTH
def test_the_environment_keeps_no_secrets(mode, monkeypatch):
    if mode == "os-only":
        needs("uid")  # as the caller's own user, /proc/<its pid>/environ is readable
    secret, token = f"s3cret-{uuid.uuid4().hex}", f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("MALT_TEST_SECRET", secret)
    monkeypatch.setenv("HF_TOKEN", token)
    # /proc/PID/environ shows the environment a process started with, not later putenv()s:
    # a process started now with the secrets stands for a malt started with HF_TOKEN set.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        program = textwrap.dedent(f"""\
            import os, sys
            seen = [repr(dict(os.environ))]
            for pid in ["self", {holder.pid}, {os.getpid()}, os.getppid()]:
                try:
                    with open(f"/proc/{{pid}}/environ", "rb") as f:
                        seen.append(f.read().decode("utf-8", "replace"))
                except OSError as error:
                    print("cannot read", pid, error)
            found = [s for s in seen if "MALT_TEST_SECRET" in s or "HF_TOKEN" in s]
            print(*found)
            sys.exit(0 if found else "no secret found")
            """)
        control = unsandboxed(program)
        assert control.returncode == 0 and secret in control.stdout and token in control.stdout
        outcome = run(program, mode)
    finally:
        holder.kill()
        holder.wait()
    assert not outcome.passed, outcome
    assert outcome.reason == "exit 1", outcome  # "no secret found", on stderr
    for value in (secret, token):
        assert value not in outcome.output and value not in outcome.reason
    if mode == "hook":
        assert f"cannot read {holder.pid} sandbox:" in outcome.output, outcome.output


@BOTH
def test_a_process_outside_cannot_be_killed(mode):
    if mode == "os-only":
        needs("uid", "pidns")  # another user id, or a PID namespace that does not see it
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        outcome = run(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)\n", mode)
        refused(outcome, mode)
        time.sleep(0.2)
        assert victim.poll() is None, "the sandbox killed a process outside"
    finally:
        victim.kill()
        victim.wait()


def test_a_signal_is_the_reason():
    outcome = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert (outcome.passed, outcome.reason) == (False, "killed by signal 11 (SIGSEGV)")


def test_printing_a_gigabyte_hits_the_output_cap():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = run("while True:\n    print('x' * 10**6)\n", seconds=10, output_bytes=1_000_000)
    assert not outcome.passed
    assert outcome.reason == "output over 1 MB"
    assert outcome.seconds < 5
    assert 0 < len(outcome.output) <= 1_000_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB
    assert_nothing_left(outcome)


def test_ctypes_is_refused():
    outcome = run("import ctypes\nctypes.CDLL(None).unshare(0)\n")
    assert not outcome.passed
    assert outcome.reason == "ImportError: sandbox: importing ctypes is not allowed"


def test_the_folder_is_removed_even_when_the_program_locks_it():
    program = textwrap.dedent("""\
        import os
        print(os.getcwd())
        os.makedirs("a/b")
        open("a/b/f", "w").write("x")
        os.chmod("a/b", 0)
        os.chmod("a", 0)
        """)
    outcome = run(program)
    assert outcome.passed, outcome
    folder = Path(outcome.output.splitlines()[0])
    assert folder.name.startswith(sandbox.PREFIX)
    assert folder.parent == Path(tempfile.gettempdir())  # the test's own (no_folder_left)
    assert not folder.exists()


# -- several at once ----------------------------------------------------------------------------


def test_four_programs_at_once_from_threads():
    programs = {
        "pass": (SQUARE + TESTS, "passed"),
        "fail": ("assert 1 + 1 == 3, 'arithmetic'\n", "AssertionError: arithmetic"),
        "loop": ("while True:\n    pass\n", "timed out after 2 s"),
        "print": ("import time\nprint('hello')\ntime.sleep(0.5)\n", "passed"),
    }
    barrier = threading.Barrier(len(programs))

    def one(source: str) -> Outcome:
        barrier.wait()
        return run_program(source, Limits(seconds=2))

    with ThreadPoolExecutor(len(programs)) as pool:
        outcomes = dict(
            zip(programs, pool.map(one, [s for s, _ in programs.values()]), strict=True)
        )
    for name, (_, reason) in programs.items():
        assert outcomes[name].reason == reason, (name, outcomes[name])
        assert_nothing_left(outcomes[name])
    assert outcomes["print"].output == "hello\n"
    uids = [a for o in outcomes.values() for a in o.isolation if a.startswith("uid:")]
    if any(a.startswith("uid:") for a in isolation()):
        assert len(set(uids)) == len(programs)  # one user id per concurrent run


# -- the HumanEval slice ------------------------------------------------------------------------


def humaneval() -> list[dict]:
    return [json.loads(line) for line in HUMANEVAL.read_text(encoding="utf-8").splitlines()]


def program(problem: dict, body: str) -> str:
    return f"{problem['prompt']}{body}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    problems = humaneval()
    assert len(problems) == 20
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(20)]
    sources = [program(p, p["canonical_solution"]) for p in problems]
    sources += [program(p, "    return None\n") for p in problems]
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda s: run_program(s, Limits(seconds=10)), sources))
    solved, stubbed = outcomes[:20], outcomes[20:]
    for problem, outcome in zip(problems, solved, strict=True):
        assert outcome.passed, (problem["task_id"], outcome.reason, outcome.output[-500:])
    for problem, outcome in zip(problems, stubbed, strict=True):
        assert not outcome.passed, problem["task_id"]
        assert outcome.reason.split(":")[0] in {"AssertionError", "TypeError"}, (
            problem["task_id"],
            outcome.reason,
        )
