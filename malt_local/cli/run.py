"""`malt run`, `malt status`, `malt show`, `malt db path`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from malt_local.cli._engine import (
    engine_option,
    engine_options,
    pop_server_settings,
    server_options,
)
from malt_local.errors import MaltError
from malt_local.grading import TASKS
from malt_local.paths import default_db_path
from malt_local.run import status as report
from malt_local.run.settings import RunSettings

db_option = click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    envvar="MALT_DB",
    help="SQLite file (default ./malt.db, or $MALT_DB).",
)
json_option = click.option("--json", "json_", is_flag=True, help="Print JSON on stdout.")


def register(cli: click.Group) -> None:
    cli.add_command(run_cmd)
    cli.add_command(status_cmd)
    cli.add_command(show_cmd)
    cli.add_command(db_group)


@click.command(name="run")
@click.argument("questions", type=click.Path(path_type=Path))
@click.option(
    "--n", "n", type=int, help="Samples per node: n generators, n² verifiers, n³ refiners [3]."
)
@click.option(
    "--model",
    "-m",
    envvar="MALT_MODEL",
    help="GGUF path or pulled alias ($MALT_MODEL); with --engine openai the served model name.",
)
@db_option
@click.option("--temperature", type=float, help="Sampling temperature [0.3, as in the paper].")
@click.option("--top-p", type=float, help="Nucleus sampling [1.0: off].")
@click.option("--top-k", type=int, help="Top-k sampling [0: off].")
@click.option("--max-tokens", type=int, help="Most tokens per node [512].")
@click.option("--seed", type=int, help="Run seed; each node's seed derives from it [0].")
@click.option("--task", help=f"Grader: {'|'.join(TASKS)} [detected from the file].")
@click.option("--theta", type=float, help="A node is positive when its value is > θ [0.5].")
@click.option("--limit", type=int, help="Only the first K questions of the file.")
@click.option(
    "--prompts", "prompts_dir", type=click.Path(path_type=Path), help="Folder of role templates."
)
@click.option("--run", "run_id", help="Continue this run id instead of the latest.")
@click.option("--new-run", is_flag=True, help="Start a new run even if the latest one matches.")
@click.option(
    "--ctx",
    type=int,
    help="KV cache in tokens: one cache all sequences share (batched engine), or one node's "
    "(simple) [sized from --max-tokens and --parallel; on a CPU a stream per sequence].",
)
@click.option("--threads", type=int, help="CPU threads [all cores].")
@click.option(
    "--gpu-layers", type=int, help="Layers on the GPU [all, when built with GPU support]."
)
@engine_option()
@server_options
@click.option(
    "--parallel",
    type=int,
    help="Most sequences decoded at once by the batched engine [32 on a CPU, 256 on a GPU].",
)
@click.option(
    "--ignore-eos", is_flag=True, default=None, help="Always generate --max-tokens (benchmarks)."
)
@click.option("--judge", is_flag=True, help="Grade every refiner leaf with the LLM judge.")
@click.option("--judge-model", help="Judge GGUF path or alias [the run's model]; implies --judge.")
@json_option
def run_cmd(
    questions: Path,
    db_path: Path | None,
    prompts_dir: Path | None,
    limit: int | None,
    run_id: str | None,
    new_run: bool,
    model: str | None,
    json_: bool,
    ctx: int | None,
    threads: int | None,
    gpu_layers: int | None,
    **settings,
) -> None:
    """Build the MALT tree for every question, storing each node as it is made.

    QUESTIONS is a .jsonl, .json, .csv, .tsv, .txt or .parquet file (GSM8K, MATH, CSQA or
    question/answer rows), UTF-8 or with a byte-order mark.
    Re-running the same command continues where it stopped.
    """
    from malt_local.run import pipeline as runner

    judge, judge_model = settings.pop("judge"), settings.pop("judge_model")
    engine_kind, parallel = settings.pop("engine_kind"), settings.pop("parallel")
    remote = pop_server_settings(engine_kind, settings)
    if limit is not None and limit < 1:
        raise MaltError(f"--limit must be at least 1 (got {limit})")
    given = RunSettings(**settings)
    given.validate()
    if given.task is not None and given.task not in TASKS:
        raise MaltError(f"unknown task '{given.task}': choose one of {', '.join(TASKS)}")
    result = runner.run_tree(
        questions,
        given,
        limit=limit,
        db_path=db_path or default_db_path(),
        model_spec=model,
        prompts_dir=prompts_dir,
        run_id=run_id,
        new_run=new_run,
        options=engine_options(
            max_tokens=given.max_tokens,
            ctx=ctx,
            threads=threads,
            gpu_layers=gpu_layers,
            parallel=parallel,
            remote=remote,
        ),
        engine_kind_name=engine_kind,
        show_progress=not json_ and sys.stderr.isatty(),
        judge=judge,
        judge_model=judge_model,
    )
    if json_:
        click.echo(json.dumps(result, indent=2))
    else:
        too_long = result["too_long"]
        click.echo(
            f"run {result['run_id']}: {result['questions']} questions, "
            f"{result['nodes_generated']} nodes generated, {result['nodes_total']} stored, "
            f"{result['questions_complete']} trees complete, "
            + (f"{len(too_long)} skipped as too long, " if too_long else "")
            + f"{result['tokens_per_second']:.1f} tok/s -> {result['db']}"
        )
        if too_long:
            from malt_local.run.too_long import Skipped

            for skipped in too_long:
                click.echo(Skipped(**skipped).describe(), err=True)
        if result.get("judge"):
            j = result["judge"]
            click.echo(
                f"judge {j['model']}: {j['judged']} leaves judged ({j['already']} before), "
                f"{j['passed']} passed, {j['invalid']} unreadable"
                + (f", {j['credited']} trees credited" if j["sets_rewards"] else "")
            )


@click.command(name="status")
@db_option
@click.option("--run", "run_id", help="Only this run.")
@json_option
def status_cmd(db_path: Path | None, run_id: str | None, json_: bool) -> None:
    """Progress and accuracy per run and role."""
    data = report.status(db_path or default_db_path(), run_id)
    if json_:
        click.echo(json.dumps(data, indent=2))
    else:
        report.print_status(data)


@click.command(name="show")
@click.argument("question_id")
@db_option
@click.option("--run", "run_id", help="Run to show [the latest with this question].")
@click.option("--width", type=int, default=100, help="Characters of each output to show.")
@json_option
def show_cmd(
    question_id: str, db_path: Path | None, run_id: str | None, width: int, json_: bool
) -> None:
    """Draw one question's tree with answers, rewards, values and labels."""
    data = report.tree(db_path or default_db_path(), question_id, run_id)
    if json_:
        click.echo(json.dumps(data, indent=2))
    else:
        report.print_tree(data, width)


@click.group(name="db")
def db_group() -> None:
    """The SQLite file."""


@db_group.command(name="path")
@db_option
def db_path_cmd(db_path: Path | None) -> None:
    """Print the database path: datasette "$(malt db path)"."""
    click.echo(str((db_path or default_db_path()).resolve()))
