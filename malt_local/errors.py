"""Errors a user can cause.

Every one of them ends the command with one line on stderr and exit code 2, before anything is
written: the library raises `MaltError` (it imports no click), and the CLI's group prints
``Error: <message>``. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# The password of a URL (`http://user:pass@host`): --endpoint and HF_ENDPOINT may carry one,
# and every message that names the URL must not.
_URL_PASSWORD_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s]*@")


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ``***`` (``user:***@host``)."""
    return _URL_PASSWORD_RE.sub(r"\1***@", text)


def clean_secret(value: str | None, name: str) -> str | None:
    """An API key or token as read from `name` (an environment variable), stripped of the
    whitespace a copy and paste or a file's last newline adds; None when empty.

    A key with a control character inside (a newline from pasting two lines) would be sent as
    a broken or split header: refused, in a line that names the variable, never the key.
    """
    value = (value or "").strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise MaltError(
            f"{name} holds a control character (a newline?) inside the key: set it to the key "
            "alone, on one line"
        )
    return value or None


class MaltError(Exception):
    """A problem with the user's input or environment, reported in one line, exit code 2.

    The message goes through `redact`: an endpoint URL in it never shows its password.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        message = redact(message)
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
