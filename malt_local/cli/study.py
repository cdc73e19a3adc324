"""`malt study`: parses flags, shows the study's progress, prints the headline. The work is in
malt_local/study/."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from malt_local.cli._options import json_option
from malt_local.cli._progress import CountBar, TrainingBar, on_terminal


class StudyDisplay:
    """The whole study on a terminal: one line per stage ("[2/5] export"), the stage's own bar
    (done/total and ETA for the trees and each evaluated configuration, steps and loss for
    training). Off a terminal, one line per stage on stderr, for a log."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.bar: Any = None
        self.training: TrainingBar | None = None
        self.label = ""

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        if self.training is not None:
            self.training.close()
            self.training = None

    def event(self, kind: str, info: dict) -> None:
        if kind in ("stage", "skip"):
            self._close()
            self.label = f"[{info['index'] + 1}/{info['total']}] {info['name']}"
            verb = "already done" if kind == "skip" else "started"
            click.echo(f"study {self.label}: {verb}", err=True)
        elif kind == "done":
            self._close()
            click.echo(f"study {self.label}: done in {info['seconds']:.1f} s", err=True)
        elif kind == "eval_config":
            self._close()
            click.echo(
                f"study {self.label}: configuration {info['index'] + 1}/{info['total']} "
                f"({info['name']})",
                err=True,
            )
        elif kind == "progress":
            if self.bar is None:
                self.bar = CountBar(self.show, f"{self.label} {info['stage']}", "turns")
            self.bar(info["progress"])
        elif kind == "train":
            if self.training is None:
                self.training = TrainingBar(self.show).__enter__()
            if info["event"] == "skip_roles":
                roles = ", ".join(info["info"]["roles"])
                click.echo(f"study {self.label}: roles skipped (no data): {roles}", err=True)
            else:
                self.training.event(info["event"], info["info"])

    def __enter__(self) -> StudyDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()


def _absolute(value: str | None) -> str | None:
    return str(Path(value).resolve()) if value else value


@click.command(name="study")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A study's TOML file (OUT/study.toml of another study reruns it).",
)
@click.option("--train", help="Questions file of the train split (the trees).")
@click.option("--test", help="Questions file of the held-out split (the evaluation).")
@click.option("--model", "-m", help="GGUF path or pulled alias.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("study"),
    show_default=True,
    help="The study's folder; the same command continues it.",
)
@click.option("--prompts", help="Prompt set: a folder, or a shipped set (default, paper).")
@click.option("--task", help="Task (grader) [detected from each file].")
@click.option("--n", type=int, help="Children per node of the train trees [3].")
@click.option("--max-tokens", type=int, help="Most tokens a turn, trees and evaluation [96].")
@click.option("--temperature", type=float, help="Sampling temperature [0.3].")
@click.option("--seed", type=int, help="Seed of the trees and of the evaluation [0].")
@click.option("--theta", type=float, help="Value above which a node is a positive [0.5].")
@click.option(
    "--keep-length-stopped/--no-keep-length-stopped",
    default=None,
    help="Export nodes cut at --max-tokens as positives too [no].",
)
@click.option("--votes", type=int, help="Passes majority-voted at test time (MV) [3].")
@click.option("--seeds", type=int, help="Evaluation seeds, each over every test question [2].")
@click.option("--samples", type=int, help="Test questions per seed (0: all) [0].")
@click.option(
    "--ablations/--no-ablations",
    default=None,
    help="Also evaluate each role trained alone, and SFT without DPO [on].",
)
@click.option("--epochs", type=float, help="SFT epochs (malt train's default).")
@click.option("--dpo-epochs", type=float, help="DPO epochs.")
@click.option("--max-steps", type=int, help="Stop each training stage after N steps.")
@click.option("--lr", type=float, help="SFT learning rate.")
@click.option("--dpo-lr", type=float, help="DPO learning rate.")
@click.option("--batch-size", type=int, help="Training rows a step.")
@click.option("--lora-r", type=int, help="LoRA rank.")
@json_option
def command(
    config_file: Path | None,
    out: Path,
    json_: bool,
    train: str | None,
    test: str | None,
    model: str | None,
    prompts: str | None,
    **flags: Any,
) -> None:
    """Run the MALT protocol as one resumable command: trees on --train, export, one adapter
    per role, then the base model and the adapters on --test, paired by seed, with 95%
    intervals, into OUT/REPORT.md and OUT/results.json.

    \b
      malt study --train train.jsonl --test test.jsonl --model smollm2-135m --out study/
      malt study --config study.toml --out study/
    Ctrl-C or kill -9 at any point: the same command continues, redoing nothing finished.
    """
    from malt_local.study.config import SHIPPED_PROMPTS, TRAIN_FIELDS, StudyConfig, merge
    from malt_local.study.config import read_toml as read_config
    from malt_local.study.pipeline import run_study

    training = {k: flags.pop(k) for k in list(flags) if k in TRAIN_FIELDS}
    given = {k: v for k, v in flags.items() if v is not None}
    if train is not None:
        given["train"] = _absolute(train)
    if test is not None:
        given["test"] = _absolute(test)
    if model is not None:
        looks_like_file = "/" in model or model.endswith(".gguf")
        given["model"] = _absolute(model) if looks_like_file else model
    if prompts is not None:
        # "default" is the shipped set a study without --prompts uses: the same study.
        named = prompts if prompts in SHIPPED_PROMPTS else _absolute(prompts)
        given["prompts"] = "" if named == "default" else named
    if {k: v for k, v in training.items() if v is not None}:
        given["training"] = training
    stored = out / "study.toml"
    config = None
    if config_file is not None:
        config = merge(read_config(config_file), given)
    elif given:
        config = merge(read_config(stored) if stored.is_file() else StudyConfig(), given)
    command_line = shlex.join(["malt", *sys.argv[1:]])
    with StudyDisplay(on_terminal(json_)) as display:
        results = run_study(out, config, command=command_line, on_event=display.event)
    if json_:
        click.echo(json.dumps(results, indent=2))
        return
    for c in results["eval"]["comparisons"]:
        if c["config"] != "malt":
            continue
        lo, hi = c["ci"]
        click.echo(
            f"{c['measure'].upper().replace('_MV', '+MV')}: base {c['base']:.1f}% -> MALT "
            f"{c['other']:.1f}% ({c['diff']:+.1f} points, 95% CI [{lo:+.1f}, {hi:+.1f}], "
            f"McNemar p = {c['p_mcnemar']:.3g}, {c['n']} question-seeds)"
        )
    click.echo(f"report: {out / 'REPORT.md'}")
