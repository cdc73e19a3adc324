"""Errors a user can cause.

Every one of them ends the command with one line on stderr and exit code 2, before anything is
written: the library raises `MaltError` (it imports no click), and the CLI's group prints
``Error: <message>``. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import base64
import re
import urllib.parse

# The password of a URL (`http://user:pass@host`): --endpoint and HF_ENDPOINT may carry one,
# and every message that names the URL must not.
_URL_PASSWORD_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s]*@")


# Every key, token and URL password this process read (`clean_secret`, `split_url_credentials`):
# a server that echoes the key it refused ("invalid key sk-...") into the body malt quotes
# must not put it on the user's screen or in a log. Short values are left out, so a one-letter
# password cannot turn every message into asterisks.
_KNOWN_SECRETS: set[str] = set()
_MIN_SECRET = 6


def remember_secret(value: str | None) -> None:
    """Have `redact` hide `value` from every later message."""
    if value and len(value) >= _MIN_SECRET:
        _KNOWN_SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ``***`` (``user:***@host``), and
    every secret this process read (`remember_secret`) by ``***``."""
    text = _URL_PASSWORD_RE.sub(r"\1***@", text)
    for secret in sorted(_KNOWN_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def split_url_credentials(url: str) -> tuple[str, str | None]:
    """`url` without its ``user:password@`` and the HTTP Basic ``Authorization`` value they
    stand for (None when the URL carries none).

    Why: a URL with credentials is what a user pastes for a server behind a proxy, but the URL
    is printed in messages, kept in settings and compared as an endpoint's name; with the
    credentials moved into a header at parse time, no later message or row can hold them. A
    URL that does not parse comes back whole, for its caller's own check to refuse.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url, None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    password = urllib.parse.unquote(password)
    pair = f"{urllib.parse.unquote(user)}:{password}"
    token = base64.b64encode(pair.encode("utf-8")).decode("ascii")
    remember_secret(password)
    remember_secret(token)
    return urllib.parse.urlunsplit(parts._replace(netloc=hostport)), f"Basic {token}"


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
    remember_secret(value)
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
