"""`malt tasks`: every task `--task` accepts, and where each comes from (`malt_local.tasks`)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from malt_local.tasks import known_tasks


@click.command(name="tasks")
@click.option("--json", "json_", is_flag=True, help="Print the list as JSON on stdout.")
def command(json_: bool) -> None:
    """List the tasks (graders): built-in ones and those plugins register.

    A package adds tasks through the `malt.tasks` entry point group; `--task
    package.module:NAME` names one without packaging. The identity (name@version:source hash)
    is recorded with every run, so a resume under a changed grader is refused.
    """
    rows = known_tasks()
    if json_:
        click.echo(json.dumps([asdict(row) for row in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in ("task", "source", "identity", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.name, row.source, row.identity, row.description)
    Console(highlight=False, width=None if sys.stdout.isatty() else 400).print(table)
