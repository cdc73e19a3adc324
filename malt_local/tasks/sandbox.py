"""Run a model-written Python program against its tests, in a sandboxed child process.

`run_program(source)` runs `source` (answer code, test code and `check(entry_point)`, composed
by the caller) and says whether it exited 0 within every limit. Anything the program does, a
crash, an endless loop, a fork bomb, an attack, comes back as an `Outcome`, never as an
exception. docs/sandbox.md describes the layers for users.

Three processes take part:

1. the caller (any thread of malt) makes a fresh folder `malt-sandbox-*`, writes the program
   there and starts stage 2 with `subprocess.Popen`: a new session, stdin from /dev/null, a
   minimal environment, no inherited descriptors but a status pipe. No `preexec_fn`: CPython
   documents it as unsafe when the parent has threads (grading runs in a thread pool beside
   generation), so everything that must happen "between fork and exec" happens in stage 2,
   a fresh single-threaded interpreter.
2. the launcher (this file run as a script, with the caller's user id) enters new mount,
   network and PID namespaces where the kernel allows it (an unprivileged user gets a user
   namespace first), makes every mount read-only but the sandbox folder, becomes the
   subreaper of what follows, forks the program's process (with a PID namespace, a small PID 1
   that forks it), writes the active layers and the program's exit status to the status pipe,
   then kills and reaps every descendant left.
3. the program's process sets its resource limits, drops root to a user id of its own (one per
   concurrent run, so that RLIMIT_NPROC counts only this run's processes and a final
   `kill(-1)` as that user reaches every process it left), asks for SIGKILL when its parent
   dies, and execs Python with the audit-hook runner, which then runs the program.

The caller reads the merged stdout and stderr with a cap, stops the launcher (SIGTERM: it kills
its descendants) when the cap or the wall clock is passed, always kills the process group (and,
without a PID namespace, every process of the run's user id) at the end, even after a pass, and
removes the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Namespaces (linux/sched.h) and mount flags (linux/mount.h), for ctypes on Python < 3.12.
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36

# Root runs each concurrent program as a user id of its own, from this block ("MAL\0"), far
# above the ids of real accounts; a lock file per id keeps two runs (threads or processes) from
# sharing one. Without the block (a container that maps fewer ids) it falls back to `nobody`,
# which RLIMIT_NPROC and the final sweep cannot be used with (other services run as nobody).
UID_BASE = 0x4D414C00
UID_SLOTS = 64
NOBODY = 65534
SETUP_FAILED = 125  # the launcher's exit status when it could not set the sandbox up
PREFIX = "malt-sandbox-"
# The user-id locks live in one place for every process of the machine, whatever TMPDIR each
# has, so that two malt processes never share a user id.
LOCK_DIR = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


@dataclass(frozen=True)
class Limits:
    """What one run may use. The defaults suit a HumanEval-style problem and its tests."""

    seconds: float = 10.0  # wall clock for the whole run; RLIMIT_CPU is this plus a second
    memory_mb: int = 1024  # address space (RLIMIT_AS) of each process of the program
    # child processes the program may start. 0: the audit hook refuses fork/exec/spawn and
    # RLIMIT_NPROC is 1 (threads count as processes for it, so none either).
    processes: int = 0
    output_bytes: int = 1_000_000  # stdout + stderr; one byte more and the run is killed
    file_bytes: int = 10_000_000  # the largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class Outcome:
    """How a run went. `passed` is True only when the program exited 0 within every limit."""

    passed: bool
    reason: str  # one line for a user: "passed", "timed out after 10 s", "AssertionError", ...
    seconds: float
    output: str  # the last `output_bytes` of stdout + stderr; the program never saw a secret
    isolation: tuple[str, ...] = ()  # the layers that were active (docs/sandbox.md)
    sandbox_id: str = ""  # MALT_SANDBOX in the environment of every process of this run


def run_program(source: str, limits: Limits | None = None) -> Outcome:
    """Run the Python program `source` in the sandbox; exit status 0 means it passed.

    Safe to call from several threads at once. Never raises: a program that breaks the
    sandbox's own set-up (or a bug of it) is a failed outcome whose reason says so, so that one
    answer cannot stop the grading of the others."""
    try:
        return _run(source, limits or Limits(), audit_hook=True)
    except Exception as error:  # a bug of the sandbox must not stop the grading either
        return Outcome(False, f"sandbox failed: {type(error).__name__}: {error}", 0.0, "")


# Runs in flight, each with the event that stops it early (`cancel_running`).
_running: set[threading.Event] = set()
_running_lock = threading.Lock()


def cancel_running() -> None:
    """Stop every program running now, as on a timeout; each comes back failed, "cancelled".

    For Ctrl-C or SIGTERM while a pool grades: without it malt would wait up to `seconds` for
    each program in flight before it could exit. The grades of cancelled runs are not stored,
    so the next run grades those answers again."""
    with _running_lock:
        for stop in _running:
            stop.set()


@functools.lru_cache(maxsize=1)
def isolation() -> tuple[str, ...]:
    """The layers a run gets on this machine (one trivial run, then cached)."""
    return run_program("pass", Limits(seconds=10)).isolation


# -- the caller's side --------------------------------------------------------------------------


def _run(source: str, limits: Limits, *, audit_hook: bool) -> Outcome:
    """`run_program`, with the audit hook optional: the tests switch it off to prove that the
    operating-system layers hold on their own. Nothing else should."""
    start = time.monotonic()
    sandbox_id = uuid.uuid4().hex
    folder = os.path.realpath(tempfile.mkdtemp(prefix=PREFIX))
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": folder,
        "TMPDIR": folder,
        "MALT_SANDBOX": sandbox_id,
    }
    proc: subprocess.Popen[bytes] | None = None
    status_r = status_w = -1
    user: _User | None = None
    statuses: list[dict] = []
    kept = _Tail(limits.output_bytes)
    timed_out = over = False
    stop = threading.Event()
    with _running_lock:
        _running.add(stop)
    try:
        user = _User.take() if os.geteuid() == 0 else None
        program = os.path.join(folder, "program.py")
        with open(program, "w", encoding="utf-8", errors="replace") as f:
            f.write(source)  # a lone surrogate cannot be UTF-8: "?", and Python says why
        if user is not None:
            try:
                os.chown(program, user.uid, user.uid)
                os.chown(folder, user.uid, user.uid)
            except OSError:  # root without CAP_CHOWN (a container): run as the caller
                user.release()
                user = None
        status_r, status_w = os.pipe()
        config = {
            "folder": folder,
            "uid": user.uid if user else None,
            "own_uid": bool(user and user.own),
            "status_fd": status_w,
            "seconds": limits.seconds,
            "memory_mb": limits.memory_mb,
            "processes": limits.processes,
            "file_bytes": limits.file_bytes,
            "open_files": limits.open_files,
            "audit_hook": audit_hook,
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env=env,
                start_new_session=True,
                pass_fds=(status_w,),
            )
        finally:
            os.close(status_w)
        assert proc.stdout is not None
        timed_out, over = _watch(
            proc.stdout.fileno(), status_r, start + limits.seconds, kept, statuses, stop
        )
    except OSError as error:  # the sandbox could not start: malt's problem, not the program's
        return Outcome(
            False, f"sandbox failed: {error}", time.monotonic() - start, "", sandbox_id=sandbox_id
        )
    finally:
        with _running_lock:
            _running.discard(stop)
        layers = next((s["layers"] for s in statuses if "layers" in s), [])
        finished = any("exit" in s or "signal" in s for s in statuses)
        _end(proc, user, pid_namespace="pidns" in layers, finished=finished)
        if proc is not None and proc.stdout is not None:
            _drain(proc.stdout.fileno(), kept)
            proc.stdout.close()
        if status_r >= 0:
            os.close(status_r)
        _remove(folder)
        if user is not None:
            user.release()
    output = kept.text()
    status = next((s for s in statuses if "exit" in s or "signal" in s), {})
    cancelled = timed_out and stop.is_set()
    return Outcome(
        passed=not (timed_out or over) and status.get("exit") == 0,
        reason="cancelled"
        if cancelled
        else _reason(limits, status, output, timed_out=timed_out, over=over),
        seconds=round(time.monotonic() - start, 3),
        output=output,
        isolation=tuple(layers),
        sandbox_id=sandbox_id,
    )


class _Tail:
    """The last `cap` bytes of the output, and how many came in all."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.cap:
            del self.data[: len(self.data) - self.cap]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _watch(
    out: int,
    status: int,
    deadline: float,
    kept: _Tail,
    statuses: list[dict],
    stop: threading.Event | None = None,
) -> tuple[bool, bool]:
    """Read output and status until the launcher is done, the clock runs out (True, _) or the
    output passes its cap (_, True). The status pipe, not the output's end, says when the
    program is done: a daemonised child may hold stdout open for ever."""
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(out, selectors.EVENT_READ, "out")
        selector.register(status, selectors.EVENT_READ, "status")
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                return True, False
            for key, _ in selector.select(min(left, 0.1)):
                chunk = os.read(key.fd, 65536)
                if key.data == "out":
                    if not chunk:
                        selector.unregister(out)
                        continue
                    kept.add(chunk)
                    if kept.total > kept.cap:
                        return False, True
                elif chunk:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        with contextlib.suppress(ValueError):
                            statuses.append(json.loads(line))
                    if any("exit" in s or "signal" in s for s in statuses):
                        return False, False
                else:
                    return False, False


def _drain(out: int, kept: _Tail) -> None:
    """What the program wrote before it ended, once every process of it is gone."""
    os.set_blocking(out, False)
    with contextlib.suppress(OSError):
        while kept.total <= kept.cap:
            chunk = os.read(out, 65536)
            if not chunk:
                break
            kept.add(chunk)


def _end(
    proc: subprocess.Popen[bytes] | None, user: _User | None, *, pid_namespace: bool, finished: bool
) -> None:
    """Kill every process of the run, also after a pass: the launcher kills its descendants
    (it is their subreaper, so setsid and double forks do not lose them); a PID namespace dies
    with its first process; the process group is killed; and with a user id of the run's own,
    kill(-1) as that id reaches anything still left."""
    if proc is None:
        return
    if proc.poll() is None:
        # The launcher kills and reaps its descendants when the program has ended, or now,
        # on SIGTERM (a timeout, too much output); SIGKILL for the group if it does not.
        if not finished:
            with contextlib.suppress(OSError):
                proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()
    if user is not None and user.own and not pid_namespace:
        user.sweep()


def _remove(folder: str) -> None:
    """Remove the sandbox folder, also where the program took its permissions away (a normal
    user, unlike root, cannot list or empty a folder of mode 0): every folder is opened up
    first, with a stack rather than recursion, as the tree may be deep."""
    shutil.rmtree(folder, ignore_errors=True)
    if not os.path.lexists(folder):
        return
    stack = [folder]
    while stack:
        path = stack.pop()
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        with contextlib.suppress(OSError), os.scandir(path) as entries:
            stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
    shutil.rmtree(folder, ignore_errors=True)


def _reason(limits: Limits, status: dict, output: str, *, timed_out: bool, over: bool) -> str:
    """One line for a user: the limit that was hit, or the program's last error line."""
    if over:
        return f"output over {_size(limits.output_bytes)}"
    if timed_out:
        return f"timed out after {limits.seconds:g} s"
    if "signal" in status:
        number = status["signal"]
        if number == signal.SIGXCPU:
            return f"timed out (CPU limit, {limits.seconds:g} s)"
        if number == signal.SIGXFSZ:
            return f"file size limit ({_size(limits.file_bytes)})"
        with contextlib.suppress(ValueError):
            return f"killed by signal {number} ({signal.Signals(number).name})"
        return f"killed by signal {number}"
    code = status.get("exit")
    if code == 0:
        return "passed"
    if code is None:
        return "no exit status (the sandbox's launcher died)"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if code == SETUP_FAILED and lines and lines[-1].startswith("sandbox:"):
        return f"sandbox failed: {lines[-1].removeprefix('sandbox:').strip()}"
    if "Traceback (most recent call last):" in output and lines:
        last = lines[-1]
        if last.startswith("MemoryError"):
            return f"memory limit ({limits.memory_mb} MB)"
        if f"[Errno {errno.EFBIG}]" in last:
            return f"file size limit ({_size(limits.file_bytes)})"
        return last if len(last) <= 200 else last[:199] + "…"
    return f"exit {code}"


def _size(count: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:g} {unit}"
    return f"{count} bytes"


_next_slot = itertools.count()
_next_slot_lock = threading.Lock()


class _User:
    """A user id for one run. `own`: an id of the run's own (locked), else `nobody`."""

    def __init__(self, uid: int, lock: int | None) -> None:
        self.uid = uid
        self.lock = lock
        self.own = lock is not None

    @classmethod
    def take(cls) -> _User:
        if not _maps(UID_BASE, UID_SLOTS):
            return cls(NOBODY, None)
        with _next_slot_lock:  # rotate, so that an id just given back rests a while
            first = next(_next_slot) % UID_SLOTS
        busy = _uids_in_use()  # a zombie nobody reaps would count against RLIMIT_NPROC
        slots = [(first + i) % UID_SLOTS for i in range(UID_SLOTS)]
        slots = [slot for slot in slots if UID_BASE + slot not in busy] or slots
        for blocking in (False, True):
            for slot in slots if not blocking else slots[:1]:
                path = os.path.join(LOCK_DIR, f"malt-uid-{UID_BASE + slot}.lock")
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except OSError:
                    os.close(fd)
                    continue
                return cls(UID_BASE + slot, fd)
        return cls(NOBODY, None)

    def sweep(self) -> None:
        """kill(-1, SIGKILL) as this user: every process of the run, wherever it went."""
        shell = "/bin/sh"
        if os.path.exists(shell):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [shell, "-c", "kill -9 -1"],
                    user=self.uid,
                    group=self.uid,
                    extra_groups=[],
                    env={},
                    cwd="/",
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=10,
                )

    def release(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def _uids_in_use() -> set[int]:
    """The user ids of the block that some process (a zombie too) has now."""
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    uid = entry.stat().st_uid
                    if UID_BASE <= uid < UID_BASE + UID_SLOTS:
                        found.add(uid)
    return found


def _maps(first: int, count: int) -> bool:
    """Whether this user namespace maps the ids first .. first+count-1."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            rows = [tuple(int(n) for n in line.split()) for line in f if line.strip()]
    except OSError:
        return False
    return any(inner <= first and first + count <= inner + size for inner, _, size in rows)


# -- the launcher (stage 2) and the program's process (stage 3) -------------------------------


def _libc() -> Any:
    """libc, for unshare, mount and prctl (ctypes: only the launcher loads it)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    if hasattr(os, "unshare"):  # Python 3.12+
        try:
            os.unshare(flags)
        except OSError:
            return False
        return True
    try:
        return _libc().unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    import ctypes

    def encode(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    libc = _libc()
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"mount {target}: {os.strerror(number)}")


def _mounts() -> Iterator[tuple[str, int]]:
    """(mount point, flags to keep) of every mount, from /proc/self/mountinfo."""
    keep = {
        "nosuid": MS_NOSUID,
        "nodev": MS_NODEV,
        "noexec": MS_NOEXEC,
        "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME,
        "relatime": MS_RELATIME,
    }
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = 0
            for option in fields[5].split(","):
                flags |= keep.get(option, 0)
            yield point, flags


def _closed_ancestor(path: str) -> str | None:
    """The highest folder on the way to `path` that other users may not pass through."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        folder = "/" + "/".join(parts[:i])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def _prepare_mounts(folder: str, python_prefix: str, hide_for_other_users: bool) -> list[str]:
    """In a fresh mount namespace: nothing propagates out, the sandbox folder stays writable,
    every other mount becomes read-only. For a dropped user id, a folder on the way to Python
    that it could not pass (/root, for a pyenv install) is covered by an empty tmpfs with Python
    alone bound back into it, which also hides the rest of that folder."""
    layers = []
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    _mount(folder, folder, None, MS_BIND, None)
    closed = _closed_ancestor(python_prefix) if hide_for_other_users else None
    if closed is not None:
        keep = [p for p in (python_prefix, folder) if p == closed or p.startswith(closed + "/")]
        fds = [os.open(p, os.O_PATH) for p in keep]
        _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        for path, fd in zip(keep, fds, strict=True):
            os.makedirs(path, 0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            os.close(fd)
        layers.append(f"hidden:{closed}")
    failed = 0
    for point, flags in _mounts():
        if point == folder:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
        except OSError:
            failed += 1
    layers.append("readonly-fs" if failed == 0 else "readonly-fs-partial")
    return layers


def _map_own_user() -> None:
    """In a new user namespace, map our ids to themselves (else files cannot be created)."""
    uid, gid = os.getuid(), os.getgid()
    with contextlib.suppress(OSError), open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _can_run_as(uid: int, paths: list[tuple[str, int]]) -> bool:
    """Whether `uid` may use each (path, os.access mode), tested with that effective id."""
    try:
        os.setegid(uid)
        os.seteuid(uid)
    except OSError:  # root without CAP_SETUID / CAP_SETGID
        os.setegid(0)
        return False
    try:
        return all(os.access(path, mode, effective_ids=True) for path, mode in paths)
    finally:
        os.seteuid(0)
        os.setegid(0)


def _launch(config: dict) -> int:
    """Stage 2: namespaces and mounts, then fork the program's process and report on it."""
    status = config["status_fd"]
    folder = config["folder"]
    uid: int | None = config["uid"]
    layers = ["session", "minimal-env", "rlimits"]
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    stdlib = os.path.join(os.path.dirname(os.__file__), "os.py")
    if os.geteuid() != 0 and _unshare(CLONE_NEWUSER):
        try:
            _map_own_user()
            layers.append("userns")
        except OSError:
            pass
    if _unshare(CLONE_NEWNS):
        layers.append("mountns")
        try:
            layers += _prepare_mounts(folder, prefix, uid is not None)
        except OSError as error:
            layers.append(f"mounts-failed:{error.strerror}")
    if _unshare(CLONE_NEWNET):
        layers.append("netns")
    if _unshare(CLONE_NEWPID):
        layers.append("pidns")
    if uid is not None:
        needed = [(python, os.X_OK), (stdlib, os.R_OK), (folder, os.W_OK | os.X_OK)]
        if _can_run_as(uid, needed):
            layers.append(f"uid:{uid}")
            if config["own_uid"]:
                layers.append("nproc")
        else:
            layers.append(f"no-uid:{uid}-cannot-reach-python")
            uid = None
    elif "userns" in layers:
        # Since Linux 5.14 RLIMIT_NPROC counts per user namespace: only this run's processes.
        # (Before, it counted all of the user's, and a program could start fewer or none.)
        layers.append("nproc")
    if config["audit_hook"]:
        layers.append("audit-hook")
    launcher = os.getpid()
    # Orphans of the program (a daemon that left with setsid) become the launcher's children.
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # RLIMIT_NPROC counts the program and its children; in a user namespace also our PID 1,
    # which runs as the same user (as root it does not count against the run's user id).
    nproc = None
    if "nproc" in layers:
        nproc = 1 + config["processes"] + ("userns" in layers and "pidns" in layers)
    forked: list[int] = []

    def stop(_signum: int, _frame: object) -> None:
        """The caller's "time is up" (SIGTERM): kill the program's process, or PID 1 and with
        it the namespace; the waitpid below then returns. Not in a child before its exec."""
        if os.getpid() == launcher and forked:
            with contextlib.suppress(OSError):
                os.kill(forked[0], signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    child = os.fork()
    if child == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if "pidns" in layers:
                _init(config, uid, python, status, nproc)
            os.close(status)
            _become_program(config, uid, python, launcher, nproc)
        except BaseException as error:  # nothing may run on after a failure: exit below
            with contextlib.suppress(OSError):
                os.write(2, f"\nsandbox: {error}\n".encode())
        os._exit(SETUP_FAILED)
    forked.append(child)
    _report(status, {"layers": layers})
    with contextlib.suppress(ChildProcessError):
        # With a PID namespace PID 1 has written the program's status already; the caller
        # reads the first status only, so this one then says nothing new.
        _report(status, _status(os.waitpid(child, 0)[1]))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_descendants(launcher)
    return 0


def _report(status: int, record: dict) -> None:
    with contextlib.suppress(OSError):  # a caller that stopped listening
        os.write(status, (json.dumps(record) + "\n").encode())


def _status(wait_status: int) -> dict:
    if os.WIFSIGNALED(wait_status):
        return {"signal": os.WTERMSIG(wait_status)}
    return {"exit": os.waitstatus_to_exitcode(wait_status)}


def _init(config: dict, uid: int | None, python: str, status: int, nproc: int | None) -> None:
    """PID 1 of the new PID namespace. The program runs as its child, not as PID 1 itself:
    the kernel ignores the signals a PID 1 sends itself without a handler (`os.kill(os.getpid(),
    SIGKILL)`, `signal.alarm`), which would make a program behave unlike anywhere else. PID 1
    reports the program's status and ends, and with it, by the kernel, every process left in
    the namespace."""
    program = os.fork()
    if program == 0:
        os.close(status)
        _become_program(config, uid, python, 1, nproc)
    _report(status, _status(os.waitpid(program, 0)[1]))
    os._exit(0)


def _kill_descendants(me: int, seconds: float = 5.0) -> None:
    """SIGKILL every child of the launcher until none is left, and reap them. The launcher is
    a subreaper, so a process that the program left behind (a daemon that double-forked and
    left the session) is reparented to it and found here; no zombie is left to count against
    the next run's RLIMIT_NPROC."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
                if parent == me:
                    os.kill(int(entry.name), signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)


def _become_program(
    config: dict, uid: int | None, python: str, parent: int, nproc: int | None
) -> None:
    """Stage 3, in the forked child: limits, user id, then exec the runner."""
    import resource

    # CPU seconds: one more than the wall clock allows (which normally ends the run first);
    # SIGXCPU at the soft limit, SIGKILL a second later.
    seconds = max(1, int(config["seconds"] + 0.999)) + 1
    memory = config["memory_mb"] * 2**20
    limits = [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, seconds, seconds + 1),
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_FSIZE, config["file_bytes"], config["file_bytes"]),
        (resource.RLIMIT_NOFILE, config["open_files"], config["open_files"]),
    ]
    if nproc is not None:
        limits.append((resource.RLIMIT_NPROC, nproc, nproc))
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # After setuid, which clears it: SIGKILL when the parent (launcher, or PID 1) dies.
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before PDEATHSIG was set
        os._exit(SETUP_FAILED)
    os.chdir(config["folder"])
    argv = [python, "-I", "-S", "-B", "-u", "-c", RUNNER, config["folder"]]
    argv += ["processes" if config["processes"] > 0 else "", "hook" if config["audit_hook"] else ""]
    os.execv(python, argv)


# The runner, run with `python -I -S -B -u -c RUNNER FOLDER PROCESSES HOOK`. The audit hook
# (PEP 578) is a second layer, the only one where the kernel grants no namespaces and malt does
# not run as root; it is not a security boundary on its own (docs/sandbox.md). Every helper it
# uses is bound as a default argument, so the program cannot swap `os.path.realpath` under it;
# changing a function's __code__ or __defaults__ is refused.
RUNNER = r"""
import os, sys

def _install(folder, processes):
    def inside(path, _folder=folder, _realpath=os.path.realpath, _join=os.path.join,
               _fspath=os.fspath, _fsdecode=os.fsdecode, _getcwd=os.getcwd):
        if isinstance(path, int):
            return True  # an open descriptor: its file was checked when it was opened
        full = _realpath(_join(_getcwd(), _fsdecode(_fspath(path))))
        return full == _folder or full.startswith(_folder + "/")

    def foreign_proc(path, _self=os.path.realpath("/proc/self"), _realpath=os.path.realpath,
                     _join=os.path.join, _fsdecode=os.fsdecode, _fspath=os.fspath,
                     _getcwd=os.getcwd):
        if isinstance(path, int):
            return False
        full = _realpath(_join(_getcwd(), _fsdecode(_fspath(path))))
        parts = full.split("/")
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and \
            "/".join(parts[:3]) != _self

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    paths = {
        "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
        "os.symlink": (1,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
        "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
        "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
        "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
        "shutil.move": (0, 1), "shutil.chown": (0,), "shutil.unpack_archive": (1,),
    }
    network = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
               "socket.gethostbyname_ex", "socket.getnameinfo"}
    spawning = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                "os.system", "subprocess.Popen", "os.startfile", "pty.spawn"}
    modules = {"ctypes", "_ctypes", "_posixsubprocess"} if not processes else {"ctypes", "_ctypes"}

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args, _inside=inside, _foreign=foreign_proc, _writes=writes, _paths=paths,
             _network=network, _spawning=spawning, _modules=modules, _refuse=refuse,
             _processes=processes, _getpid=os.getpid):
        if event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & _writes):
                if not _inside(path):
                    _refuse(f"writing {path!r}")
            if _foreign(path):
                _refuse(f"opening {path!r}")
        elif event in _paths:
            for i in _paths[event]:
                if i < len(args) and not _inside(args[i]):
                    _refuse(f"{event} on {args[i]!r}")
        elif event in _network:
            _refuse(event)
        elif event in _spawning and not _processes:
            _refuse(event)
        elif event.startswith("ctypes."):
            _refuse(event)
        elif event == "import" and args[0].partition(".")[0] in _modules:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        elif event in ("os.kill", "os.killpg") and not _processes and args[0] not in (0, _getpid()):
            _refuse(event)
        elif event == "object.__setattr__" and args[1] in (
                "__code__", "__defaults__", "__kwdefaults__"):
            _refuse(f"setting {args[1]}")
        elif event == "sys.addaudithook":
            raise RuntimeError("sandbox: no more audit hooks")

    sys.addaudithook(hook)

folder, processes, hook = sys.argv[1], sys.argv[2] == "processes", sys.argv[3] == "hook"
program = os.path.join(folder, "program.py")
with open(program, encoding="utf-8") as f:
    source = f.read()
if hook:
    _install(os.path.realpath(folder), processes)
del _install
sys.argv = [program]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__file__": program})
"""


if __name__ == "__main__":
    sys.exit(_launch(json.loads(sys.argv[1])))
