"""`malt export`: role datasets (SFT, DPO, the seed's JSON) and a manifest, from the database."""

from __future__ import annotations

import json
from pathlib import Path

import click

from malt_local.cli._options import db_option, json_option, setting
from malt_local.export.options import FORMATS, ExportOptions
from malt_local.paths import default_db_path
from malt_local.roles import ROLES

ROLE_CHOICES = (*ROLES, "all")
FORMAT_CHOICES = (*FORMATS, "all")


@click.command(name="export")
@click.option(
    "--role",
    default="all",
    show_default=True,
    metavar="|".join(ROLE_CHOICES),
    help="Which role's data.",
)
@click.option(
    "--format",
    "format_",
    default="all",
    show_default=True,
    metavar="|".join(FORMAT_CHOICES),
    help="sft: ROLE.sft.jsonl; dpo: ROLE.dpo.jsonl (TRL preference pairs); "
    "json: ROLE_training.json (the seed's format).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("export"),
    show_default=True,
    help="Output folder (created; files are replaced whole).",
)
@setting(
    ExportOptions,
    "theta",
    type=float,
    help="Relabel: generator/verifier positive when value > θ [each run's θ].",
)
@click.option(
    "--run",
    "run_ids",
    multiple=True,
    help="Only this run (repeatable) [every run in the database].",
)
@setting(
    ExportOptions,
    "valid_fraction",
    type=float,
    help="Also write ROLE/train.jsonl and ROLE/valid.jsonl, split by question.",
)
@setting(
    ExportOptions,
    "max_pairs_per_group",
    type=int,
    help="DPO: at most K pairs per sibling group, largest value margin first [all].",
)
@setting(
    ExportOptions,
    "keep_length_stopped",
    is_flag=True,
    help="Keep nodes cut off at --max-tokens as SFT positives and DPO chosen sides.",
)
@db_option
@json_option
def command(
    role: str,
    format_: str,
    out: Path,
    theta: float | None,
    run_ids: tuple[str, ...],
    valid_fraction: float | None,
    max_pairs_per_group: int | None,
    keep_length_stopped: bool,
    db_path: Path | None,
    json_: bool,
) -> None:
    """Export training data for each role: positives for SFT, sibling pairs for DPO.

    \b
    Positives (paper, Algorithm 1): generator and verifier nodes whose value is > θ,
    refiner leaves with reward 1. DPO pairs: a positive and a negative child of the
    same parent. Only complete trees are exported. manifest.json in the output folder
    records counts, θ, source runs, model sha256, prompt hashes and the licence notice.
    """
    from malt_local.export.options import parse_choice
    from malt_local.export.pipeline import export

    options = ExportOptions(
        roles=parse_choice(role, ROLES, "role"),
        formats=parse_choice(format_, FORMATS, "format"),
        theta=theta,
        run_ids=run_ids,
        valid_fraction=valid_fraction,
        max_pairs_per_group=max_pairs_per_group,
        keep_length_stopped=keep_length_stopped,
    )
    manifest = export(db_path or default_db_path(), out, options)
    if json_:
        click.echo(json.dumps({"out": str(out), "manifest": manifest}, indent=2))
        return
    q = manifest["questions"]
    runs = ", ".join(s["run_id"] for s in manifest["sources"])
    theta_text = manifest["theta"] if manifest["theta"] is not None else "per run"
    click.echo(
        f"exported {q['exported']} questions from run {runs} "
        f"({q['incomplete_skipped']} incomplete skipped), θ {theta_text} -> {out}"
    )
    for r, counts in manifest["counts"].items():
        click.echo(f"  {r:<9} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
        left = manifest["left_out"][r]
        if any(left.values()):
            click.echo(
                f"  {'':<9} left out: {left['length_stopped']} length-stopped, "
                f"{left['duplicate_sft']} duplicate SFT, {left['identical_pairs']} identical pairs"
            )
    for notice in manifest["licence_notices"]:
        click.echo(f"licence: {notice}")
    if valid_fraction is not None:
        for r, counts in manifest["counts"].items():
            empty = [part for part in ("train", "valid") if counts.get(part) == 0]
            if empty:
                click.echo(
                    f"warning: {r} {' and '.join(empty)} split is empty "
                    "(mlx-lm needs both): export more questions or change --valid-fraction",
                    err=True,
                )
