"""`make bench` end to end on a tiny tree: the four parts run with the real model (the last one
through a real llama-server) and the report's ratios are the ones its own table implies. (Speed
goals are the benchmark's business; this only checks that it measures what it says it
measures.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        m = re.match(r"\| \((a|b|c|d|e)\) ", line)
        if m:
            rows[m.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def test_bench_runs_both_paths_on_the_same_tree_and_reports_consistent_ratios(
    small_model, tmp_path
):
    out = tmp_path / "BENCH.md"
    r = subprocess.run(
        [
            sys.executable, "-m", "malt_local.bench", "--model", str(small_model),
            "--questions", "1", "--n", "2", "--max-tokens", "8", "--ceiling-seconds", "0.2",
            "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    md = out.read_text()
    rows = table_rows(md)
    assert set(rows) == {"a", "b", "c", "d", "e"}
    # One question at n = 2 is 2 + 4 + 8 nodes of exactly 8 tokens on every tree path,
    # llama-server's and the adapters' included.
    assert rows["a"][1] == rows["b"][1] == rows["d"][1] == rows["e"][1] == str(14 * 8)
    assert rows["a"][4] != "—" and rows["d"][4] != "—" and rows["c"][4] == "—"
    tps = {k: float(v[3]) for k, v in rows.items()}
    ba = float(re.search(r"b/a = ([\d.]+)×", md).group(1))
    bc = float(re.search(r"b/c = (\d+)%", md).group(1))
    assert ba == pytest.approx(tps["b"] / tps["a"], abs=0.02)
    assert bc == pytest.approx(100 * tps["b"] / tps["c"], abs=1.5)
    bd = float(re.search(r"b/d = ([\d.]+)×", md).group(1))
    assert bd == pytest.approx(tps["b"] / tps["d"], abs=0.02)
    eb = float(re.search(r"e/b = ([\d.]+)×", md).group(1))
    assert eb == pytest.approx(tps["e"] / tps["b"], abs=0.02)
    # Role by role, no child reuses a parent's cache under another role's adapters.
    assert re.search(r"\(0 prompt tokens reused, against [1-9]\d* in \(b\)\)", md)
    # The server had at least one of its slots busy on every step it decoded.
    busy = float(re.search(r"\*\*([\d.]+) requests in flight per step\*\*", md).group(1))
    assert 1.0 <= busy <= int(re.search(r"\(d\) .* (\d+) slots", md).group(1))
    assert "a stream for each of" in md and "(CPU)" in md
    assert re.search(r"\| 27 \| [\d.]+ \| [\d.]+ \|", md)  # the sampling timings


def test_hand_written_notes_below_the_marker_survive_a_rerun(tmp_path):
    from malt_local.bench.throughput import KEEP_MARKER, kept_notes

    out = tmp_path / "BENCH.md"
    assert kept_notes(out) == ""
    out.write_text("# old table\n| 1 |\n")
    assert kept_notes(out) == ""
    out.write_text(f"# old table\n| 1 |\n\n{KEEP_MARKER}\n## Prompt tokens\nsaved 30%\n")
    assert kept_notes(out) == f"\n{KEEP_MARKER}\n## Prompt tokens\nsaved 30%\n"


def test_view_part_builds_a_database_and_times_every_page_over_http(tmp_path):
    """`--part view` on a small synthetic run: every page answered (status 200) and printed
    with a time; how fast is the benchmark's business (BENCHMARKS.md), not this test's."""
    from malt_local.bench.view import pages

    db = tmp_path / "view.db"
    r = subprocess.run(
        [sys.executable, "-m", "malt_local.bench", "--part", "view", "--questions", "30",
         "--repeat", "2", "--db", str(db)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "built 30 questions, 1170 nodes" in r.stdout
    rows = {
        cells[0]: cells[1:]
        for line in r.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| page", "| ---"))
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    names = [name for name, _ in pages("", 30)]
    assert list(rows) == names and len(names) >= 15
    for name, (status, kib, first, median, worst) in rows.items():
        assert float(kib) >= 0 and float(first) >= 0, name
        assert status == "200", name
        assert float(median) >= 0 and float(worst) >= float(median), name
    # The pages list every kind of page the server has.
    paths = [path for _, path in pages("", 30)]
    for kind in ("/", "/run/rbench", "/questions", "/tree/", "/pairs", "/evals", "/training"):
        assert any(kind in p for p in paths), kind
    # A second run reuses the database it was given.
    r = subprocess.run(
        [sys.executable, "-m", "malt_local.bench", "--part", "view", "--questions", "30",
         "--repeat", "1", "--db", str(db)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0 and "built" not in r.stdout and "slowest page" in r.stdout
