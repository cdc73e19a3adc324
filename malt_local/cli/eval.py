"""`malt eval`: SA / MA with majority voting and per-role LoRA adapters. The work is in
evaluate.py; this module parses flags and prints the paper-shaped tables."""

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
from malt_local.cli.run import db_option, json_option
from malt_local.grading import TASKS
from malt_local.paths import default_db_path


def register(cli: click.Group) -> None:
    cli.add_command(eval_cmd)


@click.command(name="eval")
@click.argument("questions", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--mode",
    type=click.Choice(["sa", "ma", "all"]),
    default="all",
    show_default=True,
    help="sa: the generator alone; ma: Generator -> Verifier -> Refiner; all: both.",
)
@click.option(
    "--votes",
    type=int,
    default=3,
    show_default=True,
    help="Independent passes per question, majority-voted (the +MV columns).",
)
@click.option(
    "--samples",
    type=int,
    default=100,
    show_default=True,
    help="Random questions per seed from each file.",
)
@click.option(
    "--seeds",
    type=int,
    default=4,
    show_default=True,
    help="Seeds; accuracy is mean ± std over them.",
)
@click.option(
    "--model",
    "-m",
    envvar="MALT_MODEL",
    help="GGUF path or pulled alias ($MALT_MODEL); with --engine openai the served model name.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="ROLE=PATH[:SCALE]",
    help="LoRA adapter GGUF for generator|verifier|refiner, scale 1.0 unless "
    ":SCALE. Repeatable; several for one role are applied together.",
)
@click.option(
    "--adapters",
    "adapters_dir",
    type=click.Path(path_type=Path),
    help="A malt train folder: every role its adapters from manifest.json (SFT, then DPO).",
)
@db_option
@click.option(
    "--temperature",
    type=float,
    default=0.3,
    show_default=True,
    help="Sampling temperature (the paper's, so votes can differ).",
)
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Top-k sampling (0: off).")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Most tokens a turn.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Base seed: question samples and turn seeds derive from it.",
)
@click.option("--task", help=f"Grader: {'|'.join(TASKS)} [detected from each file].")
@click.option(
    "--prompts", "prompts_dir", type=click.Path(path_type=Path), help="Folder of role templates."
)
@click.option("--ctx", type=int, help="Context size in tokens [from max tokens].")
@click.option("--threads", type=int, help="CPU threads [all cores].")
@click.option("--gpu-layers", type=int, help="Layers on the GPU [all, with GPU support].")
@engine_option()
@server_options
@click.option("--parallel", type=int, help="Most sequences decoded at once by the batched engine.")
@json_option
def eval_cmd(
    questions: tuple[Path, ...],
    mode: str,
    votes: int,
    samples: int,
    seeds: int,
    model: str | None,
    adapters: tuple[str, ...],
    adapters_dir: Path | None,
    db_path: Path | None,
    temperature: float,
    top_p: float,
    top_k: int,
    max_tokens: int,
    seed: int,
    task: str | None,
    prompts_dir: Path | None,
    ctx: int | None,
    threads: int | None,
    gpu_layers: int | None,
    engine_kind: str,
    parallel: int | None,
    json_: bool,
    **server_flags,
) -> None:
    """Evaluate the roles at test time: SA, SA+MV, MA, MA+MV, and with --adapter the same
    with per-role LoRA adapters, as mean ± std over seeds.

    QUESTIONS are one or more benchmark files (a row each). Every turn is stored in the
    database; re-running the same command generates only what is missing.
    """
    from malt_local.evaluate.pipeline import run_eval
    from malt_local.evaluate.settings import EvalSettings
    from malt_local.run.pipeline import progress_display

    settings = EvalSettings(
        mode=mode,
        votes=votes,
        samples=samples,
        seeds=seeds,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=max_tokens,
        seed=seed,
        task=task,
    )
    settings.validate()
    remote = pop_server_settings(engine_kind, server_flags)
    if adapters_dir is not None:
        from malt_local.training.manifest import adapter_values

        adapters = (*adapter_values(adapters_dir), *adapters)
    show = not json_ and sys.stderr.isatty()
    with progress_display(show, None, "malt eval", "turns") as on_progress:
        result = run_eval(
            list(questions),
            settings,
            db_path=db_path or default_db_path(),
            model_spec=model,
            adapter_values=adapters,
            prompts_dir=prompts_dir,
            options=engine_options(
                max_tokens=max_tokens,
                ctx=ctx,
                threads=threads,
                gpu_layers=gpu_layers,
                parallel=parallel,
                remote=remote,
            ),
            engine_kind_name=engine_kind,
            on_progress=on_progress,
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
