"""`malt db path`: where the SQLite file is, so `datasette "$(malt db path)"` just works."""

from __future__ import annotations

from pathlib import Path

import click

from malt_local.cli._options import db_option
from malt_local.paths import default_db_path


@click.group(name="db")
def command() -> None:
    """The SQLite file."""


@command.command(name="path")
@db_option
def db_path_cmd(db_path: Path | None) -> None:
    """Print the database path: datasette "$(malt db path)"."""
    click.echo(str((db_path or default_db_path()).resolve()))
