"""Errors a user can cause.

Every one of them ends the command with one line on stderr and exit code 2, before anything is
written: the CLI lets `MaltError` through click, which prints ``Error: <message>``. Anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import click


class MaltError(click.ClickException):
    """A problem with the user's input or environment, reported in one line, exit code 2."""

    exit_code = 2
