"""The `malt` command line: parses flags, calls the library, prints. No logic lives here.

\b
Each command group sits in its own module of this package and is registered below.
"""

from __future__ import annotations

import sys

import click

from malt_local import __version__
from malt_local.cli import interrupts
from malt_local.errors import EXIT_TERMINATED, MaltError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


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
            click.echo(f"Error: {exc.format_message()}", err=True)
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


def _register() -> None:
    # Command modules: one per group, each exposing `register(cli)`.
    from malt_local.cli import run as run_cmds

    run_cmds.register(cli)
    # -- more command modules register here (one line each) --
    __import__("malt_local.cli.export", fromlist=["register"]).register(cli)
    __import__("malt_local.cli.eval", fromlist=["register"]).register(cli)
    __import__("malt_local.cli.view", fromlist=["register"]).register(cli)
    from malt_local.cli import pull as pull_cmds

    pull_cmds.register(cli)
    __import__("malt_local.cli.train", fromlist=["register"]).register(cli)


_register()
