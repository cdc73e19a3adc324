"""`malt view`: serve the database read-only in the browser."""

from __future__ import annotations

from pathlib import Path

import click

from malt_local.cli._options import db_option
from malt_local.paths import default_db_path


@click.command(name="view")
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="0: any free port.",
)
@click.option("--open", "open_", is_flag=True, help="Open the page in the default browser.")
@click.option(
    "--train",
    type=click.Path(path_type=Path),
    help="`malt train` output folder (its manifest.json) for the loss curves [./adapters].",
)
def command(db_path: Path | None, host: str, port: int, open_: bool, train: Path | None) -> None:
    """Browse runs, trees, DPO pairs, evaluations and training curves in the browser.

    \b
    Read-only (SQLite's mode=ro; immutable on read-only media), live while `malt run`
    writes (reload a page, or leave a run page open: it reloads itself), offline (every
    asset ships with malt, and pages run no scripts). Prints the URL; Ctrl-C stops.
        malt view --db malt.db --open
    """
    from malt_local.view.server import ViewServer, is_loopback

    path = db_path or default_db_path()
    if not is_loopback(host):
        click.echo(
            f"warning: listening on {host}, not a loopback address: anyone who can reach this "
            "machine can read the database",
            err=True,
        )
    server = ViewServer(path, host, port, train)
    click.echo(server.url)
    click.echo(f"malt view: {path} read-only at {server.url} (Ctrl-C stops)", err=True)
    if open_:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
