"""`malt train`: parses flags, shows progress, prints what was written. The work is in
malt_local/training/; nothing here imports torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from malt_local.cli._options import json_option, setting
from malt_local.cli._progress import TrainingBar, on_terminal
from malt_local.roles import ROLES
from malt_local.training.lengths import MAX_CUT_SHARE
from malt_local.training.settings import DEVICES, REPORTERS, TrainSettings


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
@setting(TrainSettings, "epochs", type=float, help="SFT epochs.")
@setting(TrainSettings, "dpo_epochs", type=float, help="DPO epochs.")
@setting(TrainSettings, "max_steps", type=int, help="Stop each stage after N steps (-1: epochs).")
@setting(TrainSettings, "lr", type=float, help="SFT learning rate.")
@setting(TrainSettings, "dpo_lr", type=float, help="DPO learning rate.")
@setting(TrainSettings, "batch_size", type=int, help="Rows a step.")
@setting(TrainSettings, "grad_accum", type=int, help="Gradient accumulation steps.")
@setting(TrainSettings, "lora_r", type=int, help="LoRA rank.")
@setting(TrainSettings, "lora_alpha", type=int, help="LoRA alpha.")
@setting(TrainSettings, "lora_dropout", type=float, help="LoRA dropout.")
@setting(
    TrainSettings,
    "max_length",
    type=int,
    show_default=False,
    help="Tokens a row; a longer row loses its end [each stage's longest row: none is cut].",
)
@click.option(
    "--max-cut-share",
    type=float,
    default=MAX_CUT_SHARE,
    show_default=True,
    help="Refuse a stage when more than this share of its rows is longer than --max-length.",
)
@setting(TrainSettings, "beta", type=float, help="DPO beta.")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto: CUDA (bf16), else Apple MPS, else the CPU.",
)
@setting(TrainSettings, "seed", type=int, help="Training seed.")
@setting(
    TrainSettings, "save_steps", type=int, help="Checkpoint every N steps (Ctrl-C also saves one)."
)
@click.option("--force", is_flag=True, help="Replace an --out (or a partial run) of other data.")
@click.option(
    "--report-to",
    type=click.Choice(REPORTERS),
    help="Also log to TensorBoard or Weights & Biases (when installed).",
)
@json_option
def command(
    export_dir: Path,
    role: str,
    stage: str,
    base: Path | None,
    out: Path,
    device: str,
    force: bool,
    report_to: str | None,
    max_cut_share: float,
    json_: bool,
    **hyperparameters: Any,
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

    settings = TrainSettings(**hyperparameters)
    if report_to:
        import importlib.util

        module = "tensorboard" if report_to == "tensorboard" else "wandb"
        if importlib.util.find_spec(module) is None:
            raise MaltError(f"--report-to {report_to}: pip install {module} first")
    roles = list(ROLES) if role == "all" else [role]
    with TrainingBar(show=on_terminal(json_)) as display:

        def on_event(kind: str, info: dict) -> None:
            if kind == "skip_roles":  # --role all: the roles with no data, in one line
                click.echo(f"roles skipped (no data): {', '.join(info['roles'])}", err=True)
            else:
                display.event(kind, info)

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
                on_event=on_event,
                skip_empty_roles=role == "all",
                max_cut_share=max_cut_share,
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
        if info.get("max_length") is not None:
            span += (
                f", {info['rows_cut']} of {info['rows']} rows cut at {info['max_length']} "
                f"tokens (longest {info['longest_row']})"
            )
        click.echo(f"{name}: {out / info['gguf']} ({info['steps']} steps{span})")
    for name, why in manifest.get("skipped", {}).items():
        click.echo(f"{name}: skipped ({why})")
    for name, why in manifest.get("skipped_roles", {}).items():
        click.echo(f"{name}: skipped, no data ({why})")
    click.echo(f"malt eval QUESTIONS --adapters {out}")
