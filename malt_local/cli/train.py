"""`malt train`: parses flags, shows progress, prints what was written. The work is in
malt_local/training/; nothing here imports torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from malt_local.cli.run import json_option
from malt_local.roles import ROLES
from malt_local.training.settings import DEVICES, REPORTERS, TrainSettings

DEFAULTS = TrainSettings()


def register(cli: click.Group) -> None:
    cli.add_command(train_cmd)


@click.command(name="train")
@click.argument("export_dir", required=False, default="export", type=click.Path(path_type=Path))
@click.option(
    "--role",
    type=click.Choice([*ROLES, "all"]),
    default="all",
    show_default=True,
    help="Which role's adapter(s).",
)
@click.option(
    "--stage",
    type=click.Choice(["sft", "dpo", "all"]),
    default="all",
    show_default=True,
    help="all: SFT for every role, then DPO for the verifier and refiner; dpo: DPO only (on "
    "the SFT adapter in --out), the generator too.",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    help="GGUF file or Hugging Face model folder to train on [the GGUF the data was made with].",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("adapters"),
    show_default=True,
    help="Adapters folder: ROLE-STAGE/ (PEFT), ROLE-STAGE.gguf, manifest.json.",
)
@click.option(
    "--epochs", type=float, default=DEFAULTS.epochs, show_default=True, help="SFT epochs."
)
@click.option(
    "--dpo-epochs", type=float, default=DEFAULTS.dpo_epochs, show_default=True, help="DPO epochs."
)
@click.option("--max-steps", type=int, default=-1, help="Stop each stage after N steps [epochs].")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="SFT learning rate.")
@click.option(
    "--dpo-lr", type=float, default=DEFAULTS.dpo_lr, show_default=True, help="DPO learning rate."
)
@click.option(
    "--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True, help="Rows a step."
)
@click.option(
    "--grad-accum",
    type=int,
    default=DEFAULTS.grad_accum,
    show_default=True,
    help="Gradient accumulation steps.",
)
@click.option("--lora-r", type=int, default=DEFAULTS.lora_r, show_default=True, help="LoRA rank.")
@click.option(
    "--lora-alpha", type=int, default=DEFAULTS.lora_alpha, show_default=True, help="LoRA alpha."
)
@click.option(
    "--lora-dropout",
    type=float,
    default=DEFAULTS.lora_dropout,
    show_default=True,
    help="LoRA dropout.",
)
@click.option(
    "--max-length",
    type=int,
    default=DEFAULTS.max_length,
    show_default=True,
    help="Tokens a row (longer rows are truncated).",
)
@click.option("--beta", type=float, default=DEFAULTS.beta, show_default=True, help="DPO beta.")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto: CUDA (bf16), else Apple MPS, else the CPU.",
)
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Training seed.")
@click.option(
    "--save-steps",
    type=int,
    default=DEFAULTS.save_steps,
    show_default=True,
    help="Checkpoint every N steps (Ctrl-C also saves one).",
)
@click.option("--force", is_flag=True, help="Replace an --out (or a partial run) of other data.")
@click.option(
    "--report-to",
    type=click.Choice(REPORTERS),
    help="Also log to TensorBoard or Weights & Biases (when installed).",
)
@json_option
def train_cmd(
    export_dir: Path,
    role: str,
    stage: str,
    base: Path | None,
    out: Path,
    epochs: float,
    dpo_epochs: float,
    max_steps: int,
    lr: float,
    dpo_lr: float,
    batch_size: int,
    grad_accum: int,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    max_length: int,
    beta: float,
    device: str,
    seed: int,
    save_steps: int,
    force: bool,
    report_to: str | None,
    json_: bool,
) -> None:
    """Train one LoRA adapter per role on what `malt export` wrote: SFT on the positives, then
    DPO on the sibling pairs (verifier, refiner) with the SFT model as reference.

    \b
    EXPORT_DIR is the export folder [export]. Ctrl-C saves a checkpoint; the same command
    resumes from it. `malt eval --adapters OUT` applies the result.
    """
    from malt_local.errors import MaltError
    from malt_local.training.pipeline import train
    from malt_local.training.trainer import TrainingInterrupted

    settings = TrainSettings(
        epochs=epochs,
        dpo_epochs=dpo_epochs,
        max_steps=max_steps,
        lr=lr,
        dpo_lr=dpo_lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        max_length=max_length,
        beta=beta,
        seed=seed,
        save_steps=save_steps,
    )
    if report_to:
        import importlib.util

        module = "tensorboard" if report_to == "tensorboard" else "wandb"
        if importlib.util.find_spec(module) is None:
            raise MaltError(f"--report-to {report_to}: pip install {module} first")
    roles = list(ROLES) if role == "all" else [role]
    with _Display(show=not json_ and sys.stderr.isatty()) as display:
        try:
            manifest = train(
                export_dir,
                out,
                roles=roles,
                stage=stage,
                settings=settings,
                base_path=base,
                device=device,
                force=force,
                report_to=report_to,
                on_event=display.event,
            )
        except TrainingInterrupted as exc:
            display.close()
            click.echo(
                f"Interrupted: {exc.stage} checkpoint saved at step {exc.step}; run the same "
                "command to resume.",
                err=True,
            )
            sys.exit(130)
    if json_:
        click.echo(json.dumps(manifest, indent=2))
        return
    for name, info in manifest["adapters"].items():
        loss = info["loss"]
        span = f", loss {loss[0][1]:.3f} -> {loss[-1][1]:.3f}" if loss else ""
        click.echo(f"{name}: {out / info['gguf']} ({info['steps']} steps{span})")
    for name, why in manifest.get("skipped", {}).items():
        click.echo(f"{name}: skipped ({why})")
    click.echo(f"malt eval QUESTIONS --adapters {out}")


class _Display:
    """A rich progress bar on stderr on a terminal (stage, role, step, loss, ETA); elsewhere one
    line per stage."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.progress = None
        self.task = None

    def __enter__(self) -> _Display:
        if self.show:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def event(self, kind: str, info: dict) -> None:
        name = info.get("stage", "")
        if kind == "skip":
            click.echo(f"{name}: skipped, {info['why']}", err=True)
        elif kind == "done":
            click.echo(f"{name}: already trained", err=True)
        elif kind == "load":
            click.echo(f"loading {info['base']}", err=True)
        elif kind == "stage":
            if self.progress is not None:
                self.task = self.progress.add_task(name, total=None, loss="-")
            else:
                click.echo(f"{name}: training on {info['rows']} rows", err=True)
        elif kind == "step" and self.progress is not None and self.task is not None:
            loss = info["loss"]
            self.progress.update(
                self.task,
                completed=info["step"],
                total=info["total"],
                loss=f"{loss:.3f}" if loss is not None else "-",
            )
        elif kind == "trained" and self.progress is None:
            name = info["peft"]
            resumed = info["resumed_from_step"]
            since = f" (resumed from step {resumed})" if resumed else ""
            click.echo(f"{name}: {info['steps']} steps{since}", err=True)
