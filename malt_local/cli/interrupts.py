"""SIGTERM stops a command the way Ctrl-C does.

Slurm, systemd, docker and `kill` stop a job with SIGTERM. Python's default for it ends the
process at once, mid-write and without a word; malt turns it into the same KeyboardInterrupt
Ctrl-C raises, so the command stops at the next Python instruction, its `finally` blocks let go
of models, claims and files, everything committed stays, and the same command continues later.
Only the exit code differs: 143 (128 + SIGTERM) instead of 130.
"""

from __future__ import annotations

import signal
import threading

from malt_local.errors import EXIT_INTERRUPTED, EXIT_TERMINATED


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled wherever Ctrl-C is."""


_terminated = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _terminated
    if _terminated:
        return  # a second SIGTERM while cleaning up would only cut the cleanup short
    _terminated = True
    raise Terminated


def install() -> None:
    """Handle SIGTERM as Ctrl-C for the rest of this process.

    Only from the main thread (Python allows no other); a command run from another thread
    (a test harness, an embedding app) leaves the process's handlers alone.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def exit_code() -> int:
    """The exit code of an interrupted command: 143 after SIGTERM, else 130."""
    return EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED
