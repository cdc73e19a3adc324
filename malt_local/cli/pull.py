"""`malt pull`: fetch or register a GGUF, verify it, print its path. The work is in
`malt_local.models`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import click

from malt_local.cli._progress import transfer_progress
from malt_local.cli.interrupts import exit_code
from malt_local.models.catalog import licence_notice_for
from malt_local.models.download import (
    PullInterrupted,
    PullResult,
    human_size,
    pull,
    register_file,
)
from malt_local.models.records import VERIFIED_ETAG, VERIFIED_MODELS_TOML, VERIFIED_TRUSTED
from malt_local.models.spec import parse_spec

_AGAINST = {
    VERIFIED_MODELS_TOML: "verified against models.toml",
    VERIFIED_ETAG: "verified against the Hub's ETag",
    VERIFIED_TRUSTED: "NOT matching models.toml, trusted with --trust",
}


def _summary(result: PullResult) -> str:
    r = result.record
    name = f"{r.alias}:{r.quant}" if r.alias else f"{r.repo}/{r.file}"
    checked = _AGAINST.get(r.verified_against, "not verified: nothing to check it against")
    verb = {
        "downloaded": f"downloaded {human_size(result.transferred)}",
        "resumed": f"resumed at byte {result.resumed_from}, downloaded "
        f"{human_size(result.transferred)}",
        "cached": "already pulled",
        "registered": "registered",
    }.get(result.action, result.action)
    return f"{name}: {verb}; sha256 {r.sha256} ({checked})"


def _interrupted(ctx: click.Context, progress: Any, exc: PullInterrupted, what: str) -> NoReturn:
    """Ctrl-C: say what was kept and how to resume, and exit as the signal asks."""
    progress.close()
    click.echo(
        f"Interrupted: {human_size(exc.have)} of {human_size(exc.total)} kept in "
        f"{exc.partial}; run `malt pull {what}` again to resume.",
        err=True,
    )
    ctx.exit(exit_code())


@click.command(name="pull")
@click.argument("spec", required=False)
@click.option(
    "--dataset",
    metavar="OWNER/NAME[@REVISION]",
    help="Fetch a Hub dataset's data files instead (questions for hf:OWNER/NAME[/CONFIG]:SPLIT).",
)
@click.option(
    "--file",
    "file_",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Register this GGUF already on disk instead of downloading (air-gapped machines).",
)
@click.option(
    "--trust", is_flag=True, help="With --file: register it even if its sha256 mismatches."
)
@click.option("--revision", help="Hub branch, tag or commit (default: models.toml's, else main).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes; only the path.")
@click.option("--json", "json_", is_flag=True, help="Print the record as JSON on stdout.")
@click.pass_context
def command(
    ctx: click.Context,
    spec: str | None,
    dataset: str | None,
    file_: Path | None,
    trust: bool,
    revision: str | None,
    quiet: bool,
    json_: bool,
) -> None:
    """Fetch a GGUF from the Hugging Face Hub, verify its sha256 and record it.

    SPEC is an alias from `malt models` (ALIAS or ALIAS:QUANT) or OWNER/REPO/FILE.gguf.
    An interrupted download resumes where it stopped when the same command runs again.
    The GGUF's path is printed on stdout.

    With --dataset OWNER/NAME[@REVISION] a dataset's Parquet, JSON and CSV files and its card
    are fetched the same way; `malt run hf:OWNER/NAME[/CONFIG]:SPLIT` then reads them offline.

    \b
    Examples:
        malt pull smollm2-135m
        malt pull llama3.1-8b:Q8_0
        malt pull bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf
        malt pull llama3.1-8b --file /media/usb/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf
        malt pull --dataset openai/gsm8k
    """
    if dataset is not None:
        if spec is not None or file_ is not None or trust or revision is not None:
            raise click.UsageError(
                "--dataset takes no SPEC, --file, --trust or --revision (pin with @REVISION)"
            )
        _pull_dataset(ctx, dataset, quiet, json_)
        return
    if spec is None:
        raise click.UsageError("give a SPEC (a model) or --dataset OWNER/NAME")
    if trust and file_ is None:
        raise click.UsageError("--trust only applies to --file")
    parsed = parse_spec(spec, revision=revision)
    progress = transfer_progress(quiet)
    try:
        if file_ is not None:
            result = register_file(parsed, file_, trust=trust, progress=progress)
        else:
            result = pull(parsed, progress=progress)
    except PullInterrupted as exc:
        _interrupted(ctx, progress, exc, spec)
    finally:
        progress.close()
    notice = licence_notice_for(result.record.alias)
    if not quiet:
        click.echo(_summary(result), err=True)
        if notice:
            click.echo(f"licence: {notice}", err=True)
    if json_:
        click.echo(json.dumps({**result.as_dict(), "licence_notice": notice}, indent=2))
    else:
        click.echo(result.record.path)


def _pull_dataset(ctx: click.Context, value: str, quiet: bool, json_: bool) -> None:
    """`--dataset`: the library fetches; this prints each file, the sources and the folder."""
    from malt_local.datasets.hub import DatasetRef, pull_dataset
    from malt_local.datasets.splits import example_sources, splits_of

    ref = DatasetRef.parse(value)
    progress = transfer_progress(quiet)
    try:
        result = pull_dataset(ref, progress=progress)
    except PullInterrupted as exc:
        _interrupted(ctx, progress, exc, ref.display)
    finally:
        progress.close()
    sources = example_sources(ref.repo, splits_of(result.snapshot))
    if not quiet:
        for name, f in result.files.items():
            verb = {
                "downloaded": f"downloaded {human_size(f.transferred)}",
                "resumed": f"resumed at byte {f.resumed_from}, downloaded "
                f"{human_size(f.transferred)}",
                "cached": "already pulled",
            }.get(f.action, f.action)
            click.echo(f"{name}: {verb}; sha256 {f.sha256}", err=True)
        where = " (HF_HUB_OFFLINE: from the cache)" if result.offline else ""
        click.echo(f"{ref.repo} at commit {result.commit}{where}", err=True)
        if sources:
            click.echo(f"questions: {', '.join(sources)}", err=True)
    if json_:
        click.echo(json.dumps({**result.as_dict(), "sources": sources}, indent=2))
    else:
        click.echo(result.snapshot)
