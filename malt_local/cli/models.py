"""`malt models`: the catalog's aliases and what is pulled (`malt_local.models`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from malt_local.models.download import human_size
from malt_local.models.listing import model_rows


@click.command(name="models")
@click.option("--json", "json_", is_flag=True, help="Print the list as JSON on stdout.")
def command(json_: bool) -> None:
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
