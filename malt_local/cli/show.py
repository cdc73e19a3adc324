"""`malt show`: one question's tree drawn in the terminal (the data: `malt_local.run.status`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from malt_local.cli._options import db_option, json_option
from malt_local.paths import default_db_path
from malt_local.run import status as status_data


@click.command(name="show")
@click.argument("question_id")
@db_option
@click.option("--run", "run_id", help="Run to show [the latest with this question].")
@click.option("--width", type=int, default=100, help="Characters of each output to show.")
@json_option
def command(
    question_id: str, db_path: Path | None, run_id: str | None, width: int, json_: bool
) -> None:
    """Draw one question's tree with answers, rewards, values and labels."""
    data = status_data.tree(db_path or default_db_path(), question_id, run_id)
    if json_:
        click.echo(json.dumps(data, indent=2))
    else:
        print_tree(data, width)


def print_tree(data: dict, width: int = 100) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    def snippet(text: str) -> str:
        flat = " ".join(text.split())
        return escape(flat if len(flat) <= width else flat[: width - 1] + "…")

    def label(node: dict) -> str:
        mark = {1: "[green]✓[/]", 0: "[red]✗[/]"}.get(node["label"], "[dim]·[/]")
        value = "-" if node["value"] is None else f"{node['value']:.2f}"
        extra = f" reward={node['reward']:.0f}" if node["reward"] is not None else ""
        # A code answer is a whole program: one line of it, and why it passed or failed.
        answer = snippet(str(node["answer"])) if node["answer"] is not None else "—"
        why = f" ({escape(node['grade_reason'])})" if node.get("grade_reason") else ""
        return (
            f"{mark} [bold]{node['role'][0].upper()}{node['path']}[/] value={value}{extra} "
            f"answer={answer}{why}  [dim]{snippet(node['output'])}[/]"
        )

    root = Tree(
        f"[bold]{data['question_id']}[/] ({data['task']}, run {data['run_id']}) "
        f"{escape(data['question'][:width])}\n"
        f" ground truth: [bold]{snippet(data['ground_truth'])}[/]"
    )
    branches = {None: root}
    for node in sorted(data["nodes"], key=lambda n: [int(b) for b in n["path"].split(".")]):
        parent = branches.get(node["parent_id"], root)
        branches[node["id"]] = parent.add(label(node))
    Console().print(root)
