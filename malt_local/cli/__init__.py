"""The `malt` command line: parses flags, calls the library, prints.

\b
One module per command (`run.py` for `malt run`), each exposing `command`, registered at the
bottom of this file; `_options.py` holds the options several commands share and `_progress.py`
every progress bar. No logic lives here: the library decides, this package parses and prints.
"""

from __future__ import annotations

import re
import sys

import click

from malt_local import __version__
from malt_local.cli import interrupts
from malt_local.errors import EXIT_TERMINATED, MaltError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


# Every character `str.splitlines` breaks a line at, and the other control characters: a value
# quoted into a message (a --task with a newline in it) must not make the error two lines.
_LINE_BREAKING = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def one_line(message: str) -> str:
    """`message` with each line break or control character written as its escape (``\\n``),
    so the error is the one line on stderr a script reads, whatever value it quotes."""
    return _LINE_BREAKING.sub(lambda m: ascii(m.group())[1:-1], message)


class MaltGroup(click.Group):
    """A click group whose errors are one line on stderr.

    click prints usage lines before a bad-flag error; a user who mistyped a value wants the one
    line that says what is wrong. Ctrl-C exits 130 (the shell's convention), after the command
    has had its chance to say what was kept; SIGTERM does the same and exits 143.
    """

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        interrupts.install()
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except (click.ClickException, MaltError) as exc:
            click.echo(f"Error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, click.Abort):
            code = interrupts.exit_code()
            click.echo("Terminated." if code == EXIT_TERMINATED else "Interrupted.", err=True)
            sys.exit(code)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=MaltGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="malt")
def cli() -> None:
    """MALT training data on your own machine, with llama.cpp.

    \b
    Quick start:
        malt pull smollm2-135m
        malt run --n 3 --model smollm2-135m questions.jsonl
        malt status
        malt export --role all --out export/
    """


# One module per command, in the order `malt --help` reads best; each exposes `command`.
from malt_local.cli import (  # noqa: E402 - the group must exist before its commands join it
    db,
    export,
    models,
    pull,
    questions,
    run,
    show,
    status,
    study,
    tasks,
    train,
    view,
)
from malt_local.cli import eval as eval_  # noqa: E402 - `eval` would shadow the builtin

for _module in (
    pull,
    models,
    tasks,
    questions,
    run,
    status,
    show,
    export,
    db,
    eval_,
    train,
    study,
    view,
):
    cli.add_command(_module.command)
