"""`malt status`: progress and accuracy per run and role (the data: `malt_local.run.status`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from malt_local.cli._options import db_option, json_option
from malt_local.paths import default_db_path
from malt_local.run import status as status_data


@click.command(name="status")
@db_option
@click.option("--run", "run_id", help="Only this run.")
@json_option
def command(db_path: Path | None, run_id: str | None, json_: bool) -> None:
    """Progress and accuracy per run and role."""
    data = status_data.status(db_path or default_db_path(), run_id)
    if json_:
        click.echo(json.dumps(data, indent=2))
    else:
        print_status(data)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_status(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not data["runs"]:
        console.print(f"No runs in {data['db']}.")
        return
    for run in data["runs"]:
        console.print(
            f"[bold]run {run['run_id']}[/] {run['created_at'][:19]}"
            f"  model {Path(run['model']).name}"
            f"  n={run['n']} θ={run['theta']} T={run['temperature']} max_tokens={run['max_tokens']}"
        )
        console.print(
            f"  questions {run['questions_complete']}/{run['questions']} complete, "
            + (f"{len(run['too_long'])} skipped as too long, " if run["too_long"] else "")
            + f"nodes {run['nodes']}/{run['nodes_expected']}, leaf accuracy "
            f"{_pct(run['leaf_accuracy'])}, {run['completion_tokens']} tokens generated, "
            f"{run['generation_seconds']:.0f} node-seconds (batched nodes overlap)"
        )
        table = Table(show_edge=False)
        for col in ("role", "nodes", "answer accuracy", "positives", "positive rate", "tokens"):
            table.add_column(col, justify="left" if col == "role" else "right")
        for role, r in run["roles"].items():
            table.add_row(
                role,
                f"{r['nodes']}/{r['expected']}",
                _pct(r["accuracy"]),
                f"{r['positives']}/{r['labelled']}",
                _pct(r["positive_rate"]),
                str(r["completion_tokens"]),
            )
        console.print(table)
        for s in run["too_long"]:
            where = f" ({s['source']})" if s["source"] else ""
            console.print(
                f"  skipped, too long: {s['question_id']}{where} needs {s['needed_tokens']} "
                f"tokens with room to answer, a node's context holds {s['limit_tokens']}",
                markup=False,
                highlight=False,
            )
