"""The CLI's bars (malt_local/cli/_progress.py) from the library's progress records."""

from __future__ import annotations

from malt_local.cli._progress import CountBar, TransferProgress, transfer_progress
from malt_local.progress import Progress


def test_count_bar_follows_the_records_and_starts_a_bar_per_stage():
    bar = CountBar(True, "malt run", "nodes")
    with bar:
        bar(Progress(total=4, done=1, stage="trees"))
        bar(Progress(total=4, done=4, completion_tokens=40, stage="trees"))
        bar(Progress(total=2, done=0, stage="judge"))
        tasks = bar._bar.tasks
        assert [(t.total, t.completed) for t in tasks] == [(4, 4), (2, 0)]
    assert bar._bar is None  # stopped on leaving


def test_count_bar_off_a_terminal_draws_nothing():
    bar = CountBar(False, "malt eval", "turns")
    with bar:
        bar(Progress(total=3, done=1))
        assert bar._bar is None


def test_transfer_progress_notes_reach_a_log_unless_quiet(capsys):
    transfer_progress(quiet=False).note("resuming at byte 10")  # stderr is no terminal here
    quiet = transfer_progress(quiet=True)
    quiet.note("not shown")
    assert isinstance(quiet, TransferProgress)
    assert capsys.readouterr().err == "resuming at byte 10\n"
