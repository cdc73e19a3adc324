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
