"""Every progress bar malt draws: rich on stderr, and only for a person watching a terminal.

The library never draws. A long operation reports through a callback: `malt run`, the judge
and `malt eval` send a `Progress` record after every stored node or generation; `malt pull`
calls a `TransferProgress` (start, advance, done, note); `malt train` sends events. This module
turns each into a bar (or, off a terminal, into the few lines a log wants), all drawn by `_bar`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from malt_local.models.download import NullProgress
from malt_local.progress import Progress


def on_terminal(json_: bool = False) -> bool:
    """Bars are for a person: never with --json, never into a pipe or a log."""
    return not json_ and sys.stderr.isatty()


def _bar(*columns: Any, console: Any = None) -> Any:
    """A started rich bar on stderr with these columns."""
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    bar = RichProgress(*columns, console=console or Console(stderr=True))
    bar.start()
    return bar


class CountBar:
    """done/total, tok/s and ETA for `malt run` and `malt eval`: use as a context manager,
    then call it with each `Progress`. A record of a new `stage` (the judge after the trees)
    starts a bar of its own. Off a terminal it draws nothing."""

    def __init__(self, enabled: bool, label: str, unit: str) -> None:
        self.enabled = enabled
        self.label = label
        self.unit = unit
        self._bar: Any = None
        self._task: Any = None
        self._stage: str | None = None

    def __enter__(self) -> CountBar:
        return self

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = _bar(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TextColumn("{task.fields[tps]:.1f} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
        if self._task is None or p.stage != self._stage:
            self._stage = p.stage
            self._task = self._bar.add_task(self.label, total=p.total, tps=0.0)
        self._bar.update(self._task, completed=p.done, total=p.total, tps=p.tokens_per_second)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class TransferProgress(NullProgress):
    """What `malt pull` reports to (the library's `models.download.Progress`): off a terminal
    the notes still reach a log on stderr; with --quiet nothing is shown."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def note(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def close(self) -> None:
        pass


class TransferBar(TransferProgress):
    """A rich bar on stderr: bytes, speed, time left, and notes printed above it."""

    def __init__(self) -> None:
        from rich.console import Console

        super().__init__()
        self.console = Console(stderr=True, highlight=False)
        self._bar: Any = None
        self._task: Any = None

    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if self._bar is None:
            self._bar = _bar(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task(description, total=total, completed=completed)
        else:
            self._bar.reset(self._task, total=total, completed=completed, description=description)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)

    def close(self) -> None:
        self.done()


def transfer_progress(quiet: bool) -> TransferProgress:
    """A bar only for a person watching stderr; notes for logs; nothing with --quiet."""
    if quiet:
        return TransferProgress(quiet=True)
    return TransferBar() if sys.stderr.isatty() else TransferProgress()


class TrainingBar:
    """`malt train`'s events: a rich bar on a terminal (stage, step, loss, ETA), else one line
    a stage on stderr. Use as a context manager; `event` is the library's callback."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> TrainingBar:
        if self.show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = _bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
        return self

    def __exit__(self, *exc: object) -> None:
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
