"""`malt pull` and `malt models`: fetch, verify and list GGUF models. The work is in hub.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from malt_local.cli import interrupts
from malt_local.models.catalog import licence_notice_for
from malt_local.models.download import (
    NullProgress,
    PullInterrupted,
    PullResult,
    human_size,
    pull,
    register_file,
)
from malt_local.models.listing import model_rows
from malt_local.models.records import VERIFIED_ETAG, VERIFIED_MODELS_TOML, VERIFIED_TRUSTED
from malt_local.models.spec import parse_spec


class _PlainProgress(NullProgress):
    """Not a terminal: no bar, but the notes still reach a log on stderr."""

    def note(self, message: str) -> None:
        click.echo(message, err=True)

    def close(self) -> None:
        pass


class _RichProgress:
    """A rich bar on stderr: bytes, speed, time left - and notes printed above it."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self._bar: Any = None
        self._task: Any = None

    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if self._bar is None:
            self._bar = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=completed)
        else:
            self._bar.reset(self._task, total=total, completed=completed, description=description)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)

    def close(self) -> None:
        self.done()


class _Quiet(NullProgress):
    def close(self) -> None:
        pass


def _progress(quiet: bool) -> Any:
    """A bar only for a human watching stderr; notes for logs; nothing with --quiet."""
    if quiet:
        return _Quiet()
    return _RichProgress() if sys.stderr.isatty() else _PlainProgress()


_AGAINST = {
    VERIFIED_MODELS_TOML: "verified against models.toml",
    VERIFIED_ETAG: "verified against the Hub's ETag",
    VERIFIED_TRUSTED: "NOT matching models.toml, trusted with --trust",
}


def _summary(result: PullResult) -> str:
    r = result.record
    name = f"{r.alias}:{r.quant}" if r.alias else f"{r.repo}/{r.file}"
    checked = _AGAINST.get(r.verified_against, "not verified: nothing to check it against")
    verb = {
        "downloaded": f"downloaded {human_size(result.transferred)}",
        "resumed": f"resumed at byte {result.resumed_from}, downloaded "
        f"{human_size(result.transferred)}",
        "cached": "already pulled",
        "registered": "registered",
    }.get(result.action, result.action)
    return f"{name}: {verb}; sha256 {r.sha256} ({checked})"


@click.command(name="pull")
@click.argument("spec")
@click.option(
    "--file",
    "file_",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Register this GGUF already on disk instead of downloading (air-gapped machines).",
)
@click.option(
    "--trust", is_flag=True, help="With --file: register it even if its sha256 mismatches."
)
@click.option("--revision", help="Hub branch, tag or commit (default: models.toml's, else main).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes; only the path.")
@click.option("--json", "json_", is_flag=True, help="Print the record as JSON on stdout.")
@click.pass_context
def pull_cmd(
    ctx: click.Context,
    spec: str,
    file_: Path | None,
    trust: bool,
    revision: str | None,
    quiet: bool,
    json_: bool,
) -> None:
    """Fetch a GGUF from the Hugging Face Hub, verify its sha256 and record it.

    SPEC is an alias from `malt models` (ALIAS or ALIAS:QUANT) or OWNER/REPO/FILE.gguf.
    An interrupted download resumes where it stopped when the same command runs again.
    The GGUF's path is printed on stdout.

    \b
    Examples:
        malt pull smollm2-135m
        malt pull llama3.1-8b:Q8_0
        malt pull bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf
        malt pull llama3.1-8b --file /media/usb/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf
    """
    if trust and file_ is None:
        raise click.UsageError("--trust only applies to --file")
    parsed = parse_spec(spec, revision=revision)
    progress = _progress(quiet)
    try:
        if file_ is not None:
            result = register_file(parsed, file_, trust=trust, progress=progress)
        else:
            result = pull(parsed, progress=progress)
    except PullInterrupted as exc:
        progress.close()
        click.echo(
            f"Interrupted: {human_size(exc.have)} of {human_size(exc.total)} kept in "
            f"{exc.partial}; run `malt pull {spec}` again to resume.",
            err=True,
        )
        ctx.exit(interrupts.exit_code())
    finally:
        progress.close()
    notice = licence_notice_for(result.record.alias)
    if not quiet:
        click.echo(_summary(result), err=True)
        if notice:
            click.echo(f"licence: {notice}", err=True)
    if json_:
        click.echo(json.dumps({**result.as_dict(), "licence_notice": notice}, indent=2))
    else:
        click.echo(result.record.path)


@click.command(name="models")
@click.option("--json", "json_", is_flag=True, help="Print the list as JSON on stdout.")
def models_cmd(json_: bool) -> None:
    """List model aliases and their quantisations: pulled or not, size, path, sha256.

    Aliases come from the shipped models.toml and your own $MALT_HOME/models.toml; files
    pulled by OWNER/REPO/FILE.gguf are listed too.
    """
    rows = model_rows()
    if json_:
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in ("alias", "quant", "pulled", "size", "path", "sha256"):
        table.add_column(column, overflow="fold")
    for row in rows:
        quant = row.quant or "-"
        table.add_row(
            row.alias or f"{row.repo}/{row.file}",
            f"{quant} (default)" if row.default else quant,
            row.status,
            human_size(row.size) if row.size else "-",
            _home_relative(row.path) if row.path else "-",
            (row.sha256[:12] + "…") if row.sha256 else "-",
        )
    # Piped, rich would wrap to 80 columns and fold every path; --json is for programs, but
    # `malt models | grep` should still see one line per row.
    Console(highlight=False, width=None if sys.stdout.isatty() else 400).print(table)


def _home_relative(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home) :] if path.startswith(home + "/") else path


def register(cli: click.Group) -> None:
    cli.add_command(pull_cmd)
    cli.add_command(models_cmd)
