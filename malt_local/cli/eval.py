"""`malt eval`: SA / MA with majority voting and per-role LoRA adapters. The work is in
`malt_local.evaluate`; this module parses flags and prints the paper-shaped tables."""

from __future__ import annotations

import json
import sys
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
from malt_local.evaluate.settings import MODES, EvalSettings
from malt_local.paths import default_db_path


@click.command(name="eval")
@click.argument("questions", nargs=-1, required=True)
@setting(
    EvalSettings,
    "mode",
    type=click.Choice(MODES),
    help="sa: the generator alone; ma: Generator -> Verifier -> Refiner; all: both.",
)
@setting(
    EvalSettings,
    "votes",
    type=int,
    help="Independent passes per question, majority-voted (the +MV columns).",
)
@setting(EvalSettings, "samples", type=int, help="Random questions per seed from each file.")
@setting(EvalSettings, "seeds", type=int, help="Seeds; accuracy is mean ± std over them.")
@model_option
@adapter_flags
@db_option
@setting(
    EvalSettings,
    "temperature",
    type=float,
    help="Sampling temperature (the paper's, so votes can differ).",
)
@setting(EvalSettings, "top_p", type=float, help="Nucleus sampling.")
@setting(EvalSettings, "top_k", type=int, help="Top-k sampling (0: off).")
@setting(EvalSettings, "max_tokens", type=int, help="Most tokens a turn.")
@setting(
    EvalSettings,
    "seed",
    type=int,
    help="Base seed: question samples and turn seeds derive from it.",
)
@setting(
    EvalSettings,
    "task",
    help="Task (grader): a name from `malt tasks` or package.module:NAME "
    "[detected from each file].",
)
@field_flags
@prompts_option
@engine_flags
@json_option
def command(
    questions: tuple[str, ...],
    model: str | None,
    adapters: tuple[str, ...],
    adapters_dir: Path | None,
    allow_mismatch: bool,
    db_path: Path | None,
    prompts_dir: Path | None,
    json_: bool,
    **flags: Any,
) -> None:
    """Evaluate the roles at test time: SA, SA+MV, MA, MA+MV, and with --adapter the same
    with per-role LoRA adapters, as mean ± std over seeds.

    QUESTIONS are one or more benchmark files (a row each) or splits of datasets fetched by
    `malt pull --dataset` (hf:OWNER/NAME[/CONFIG]:SPLIT). Every turn is stored in the
    database; re-running the same command generates only what is missing.
    """
    from malt_local.evaluate.pipeline import run_eval

    fields = pop_fields(flags)
    engine_name, options = pop_engine_options(flags, flags["max_tokens"])
    settings = EvalSettings(**flags)
    settings.validate()
    with CountBar(on_terminal(json_), "malt eval", "turns") as bar:
        result = run_eval(
            list(questions),
            settings,
            db_path=db_path or default_db_path(),
            model_spec=model,
            adapter_values=adapters,
            adapters_dir=adapters_dir,
            allow_mismatch=allow_mismatch,
            prompts_dir=prompts_dir,
            options=options,
            engine_kind_name=engine_name,
            on_progress=bar,
            fields=fields,
        )
    if json_:
        click.echo(json.dumps(result, indent=2))
    else:
        print_results(result)


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def print_results(result: dict) -> None:
    """The paper's Table 1 shape, then turn-wise accuracy and self-correction for MA."""
    from rich.console import Console
    from rich.table import Table

    # Not a terminal (a pipe, a log): wide enough that no cell is cut.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    s = result["settings"]
    title = (
        f"malt eval {result['eval_run']}: accuracy % (mean ± std over {s['seeds']} seeds, "
        f"MV@{s['votes']})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("benchmark")
    table.add_column("n", justify="right")
    for col in result["columns"]:
        table.add_column(col, justify="right")
    for b in result["benchmarks"]:
        table.add_row(
            b["benchmark"],
            f"{b['samples']}×{b['seeds']}",
            *(_cell(b["accuracy"].get(c)) for c in result["columns"]),
        )
    console.print(table)

    ma_cols = [c for c in result["columns"] if c.startswith("MA")]
    if ma_cols:
        turn = Table(title="turn-wise accuracy % (MA)", title_justify="left")
        for name in ("benchmark", "column", "after G", "after V", "after R", "V states answer"):
            turn.add_column(name, justify="left" if name in ("benchmark", "column") else "right")
        fix = Table(
            title="self-correction, generator -> refiner (% of questions)", title_justify="left"
        )
        for name in (
            "benchmark",
            "column",
            "wrong→right",
            "right→right",
            "wrong→wrong",
            "right→wrong",
            "n",
        ):
            fix.add_column(name, justify="left" if name in ("benchmark", "column") else "right")
        for b in result["benchmarks"]:
            for c in ma_cols:
                t = b["turnwise"][c]
                turn.add_row(
                    b["benchmark"],
                    c,
                    _cell(t["after_generator"]),
                    _cell(t["after_verifier"]),
                    _cell(t["after_refiner"]),
                    f"{t['verifier_states_answer']:.1f}%",
                )
                sc = b["self_correction"][c]
                fix.add_row(
                    b["benchmark"],
                    c,
                    *(
                        f"{sc['percent'][k]:.1f}"
                        for k in (
                            "wrong_to_right",
                            "right_to_right",
                            "wrong_to_wrong",
                            "right_to_wrong",
                        )
                    ),
                    str(sc["questions"]),
                )
        console.print(turn)
        console.print(fix)
    for role, role_adapters in result["adapters"].items():
        for a in role_adapters:
            console.print(
                f"{role} adapter: {a['path']} (scale {a['scale']}, rank {a['rank']}, "
                f"sha256 {a['sha256'][:12]})"
            )
    console.print(
        f"{result['generations_new']} turns generated, {result['generations_total']} in this "
        f"evaluation -> {result['db']}"
    )
