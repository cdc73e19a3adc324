"""Errors a user can cause.

Every one of them ends the command with one line on stderr and exit code 2, before anything is
written: the library raises `MaltError` (it imports no click), and the CLI's group prints
``Error: <message>``. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class MaltError(Exception):
    """A problem with the user's input or environment, reported in one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def format_message(self) -> str:
        return self.message


# Exit codes other than 0 (done) and 2 (a user error, above); docs/troubleshooting.md lists them.
EXIT_DISK_FULL = 75  # sysexits EX_TEMPFAIL: free space and run the same command again
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM), as Slurm, systemd and docker stop a job


class DiskFullError(MaltError):
    """The disk filled while malt wrote a file: everything committed before is intact.

    Its own exit code, so a job script can tell "free space and rerun" from a bad flag.
    """

    exit_code = EXIT_DISK_FULL
