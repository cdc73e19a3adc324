"""`malt run`: parses the flags, draws the progress, prints the summary; the work is in
`malt_local.run.pipeline`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from malt_local.cli._options import (
    adapter_flags,
    db_option,
    engine_flags,
    field_flags,
    json_option,
    model_option,
    pop_engine_options,
    pop_fields,
    prompts_option,
    setting,
)
from malt_local.cli._progress import CountBar, on_terminal
from malt_local.paths import default_db_path
from malt_local.run.settings import RunSettings


@click.command(name="run")
@click.argument("questions")
@setting(
    RunSettings,
    "n",
    "--n",
    type=int,
    help="Samples per node: n generators, n² verifiers, n³ refiners.",
)
@model_option
@adapter_flags
@db_option
@setting(RunSettings, "temperature", type=float, help="Sampling temperature (the paper's).")
@setting(RunSettings, "top_p", type=float, help="Nucleus sampling (1.0: off).")
@setting(RunSettings, "top_k", type=int, help="Top-k sampling (0: off).")
@setting(RunSettings, "max_tokens", type=int, help="Most tokens per node.")
@setting(RunSettings, "seed", type=int, help="Run seed; each node's seed derives from it.")
@setting(
    RunSettings,
    "task",
    help="Task (grader): a name from `malt tasks` or package.module:NAME [detected from the file].",
)
@setting(RunSettings, "theta", type=float, help="A node is positive when its value is > θ.")
@click.option("--limit", type=int, help="Only the first K questions of the file.")
@field_flags
@prompts_option
@click.option("--run", "run_id", help="Continue this run id instead of the latest.")
@click.option("--new-run", is_flag=True, help="Start a new run even if the latest one matches.")
@engine_flags
@click.option(
    "--ignore-eos", is_flag=True, default=None, help="Always generate --max-tokens (benchmarks)."
)
@click.option("--judge", is_flag=True, help="Grade every refiner leaf with the LLM judge.")
@click.option("--judge-model", help="Judge GGUF path or alias [the run's model]; implies --judge.")
@json_option
def command(
    questions: str,
    db_path: Path | None,
    prompts_dir: Path | None,
    limit: int | None,
    run_id: str | None,
    new_run: bool,
    model: str | None,
    adapters: tuple[str, ...],
    adapters_dir: Path | None,
    allow_mismatch: bool,
    judge: bool,
    judge_model: str | None,
    json_: bool,
    **flags: Any,
) -> None:
    """Build the MALT tree for every question, storing each node as it is made.

    QUESTIONS is a .jsonl, .json, .csv, .tsv, .txt or .parquet file (GSM8K, MATH, CSQA or
    question/answer rows), UTF-8 or with a byte-order mark, or a split of a dataset fetched
    by `malt pull --dataset`: hf:OWNER/NAME[/CONFIG]:SPLIT (hf:openai/gsm8k/main:test).
    Re-running the same command continues where it stopped. With --adapters (a malt train
    folder) or --adapter each role's nodes are made with its trained LoRA adapters.
    """
    from malt_local.run.pipeline import run_tree

    fields = pop_fields(flags)
    engine_name, options = pop_engine_options(flags, flags["max_tokens"])
    given = RunSettings(**flags)
    given.validate()
    with CountBar(on_terminal(json_), "malt run", "nodes") as bar:
        result = run_tree(
            questions,
            given,
            limit=limit,
            db_path=db_path or default_db_path(),
            model_spec=model,
            prompts_dir=prompts_dir,
            run_id=run_id,
            new_run=new_run,
            options=options,
            engine_kind_name=engine_name,
            on_progress=bar,
            judge=judge,
            judge_model=judge_model,
            adapter_values=adapters,
            adapters_dir=adapters_dir,
            allow_mismatch=allow_mismatch,
            fields=fields,
        )
    if json_:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(
        f"run {result.run_id}: {result.questions} questions, "
        f"{result.nodes_generated} nodes generated, {result.nodes_total} stored, "
        f"{result.questions_complete} trees complete, "
        + (f"{len(result.too_long)} skipped as too long, " if result.too_long else "")
        + f"{result.tokens_per_second:.1f} tok/s -> {result.db}"
    )
    for role, files in result.config.get("adapter_files", {}).items():
        click.echo(f"{role} adapters: {', '.join(files)}")
    for skipped in result.too_long:
        click.echo(skipped.describe(), err=True)
    if result.layout_changed:
        click.echo(
            f"note: run {result.run_id} went on under another KV layout than before "
            f"({', '.join(result.layout_changed)}); its trees will not match a fresh run's",
            err=True,
        )
    if result.judge is not None:
        j = result.judge
        click.echo(
            f"judge {j.model}: {j.judged} leaves judged ({j.already} before), "
            f"{j.passed} passed, {j.invalid} unreadable"
            + (f", {j.credited} trees credited" if j.sets_rewards else "")
        )
