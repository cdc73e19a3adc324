"""One command, one tree: the batched engine's KV layout follows the flags and the model, never
the free memory, and a run keeps the layout it began with when it is continued.

The real small model, real `malt run` processes, and for the memory test a real process beside
them holding all but about 3 GiB of the machine's available memory.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

from tests.conftest import EXAMPLES, malt, run_argv

GIB = 2**30
# Free memory left beside the second run: below what the old, memory-sized layout needed to
# keep a stream per sequence for these settings (a quarter of the free memory had to hold 33
# streams of 2,560 cells: about 7.5 GiB on SmolLM2-135M), above what the fixed plan takes.
LEFT_FREE = 3 * GIB
# The hog raises its own OOM score: if the kernel must kill something, it is the hog.
HOG = """
import sys, time
open('/proc/self/oom_score_adj', 'w').write('1000')
held = b'\\x01' * int(sys.argv[1])  # written, so the pages are really taken
print('ready', flush=True)
time.sleep(600)
"""


def available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def outputs(db) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT path, output FROM nodes ORDER BY path").fetchall()
    finally:
        conn.close()


def stored_config(db) -> dict:
    conn = sqlite3.connect(db)
    try:
        (config,) = conn.execute("SELECT config FROM runs").fetchone()
    finally:
        conn.close()
    return json.loads(config)


def test_same_tree_with_plenty_or_3_gib_of_memory_free(tmp_path, small_model):
    # 96 tokens a node: the benchmark's tree, where the old sizing switched layouts.
    args = dict(n=2, max_tokens=96, limit=1, questions=EXAMPLES / "gsm8k.jsonl")
    plenty = tmp_path / "plenty.db"
    r = malt(*run_argv(plenty, small_model, "--seed", "3", "--json", **args))
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)["config"]["layout"]
    hog = subprocess.Popen(
        [sys.executable, "-c", HOG, str(max(0, available() - LEFT_FREE))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hog.stdout.readline().strip() == "ready"
        time.sleep(1)  # let the kernel settle its reclaim
        # Other processes move too: enough that it stays well below the old sizing's 7.5 GiB.
        assert available() < LEFT_FREE + 2 * GIB, available() / GIB
        short = tmp_path / "short.db"
        r = malt(*run_argv(short, small_model, "--seed", "3", "--json", **args))
        assert hog.poll() is None, "the memory hog was killed: the test did not hold memory"
    finally:
        hog.kill()
        hog.wait()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["layout"] == first
    assert not first["kv_unified"]  # a stream per sequence, chosen without reading free memory
    texts = outputs(plenty)
    assert len(texts) == 14 and outputs(short) == texts


def test_a_run_records_its_layout_and_a_resume_keeps_it(tmp_path, small_model):
    db = tmp_path / "r.db"
    r = malt(*run_argv(db, small_model, "--json", limit=1))
    assert r.returncode == 0, r.stderr
    layout = json.loads(r.stdout)["config"]["layout"]
    assert stored_config(db)["layout"] == layout
    assert set(layout) >= {"kv_unified", "parallel", "n_seq_max", "n_ctx", "seq_limit"}
    # The run began under a layout today's defaults would not choose (another malt version's,
    # or a machine's with a GPU): the resume is made with the recorded one.
    began = {**layout, "kv_unified": True, "parallel": 4, "n_seq_max": 8, "n_ctx": 4096}
    began["n_batch"] = max(began["n_ubatch"], 4 + 256)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE runs SET config = ?", (json.dumps({**stored_config(db), "layout": began}),)
        )
    conn.close()
    before = len(outputs(db))
    r = malt(*run_argv(db, small_model, "--json", limit=2))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["layout"] == began
    assert stored_config(db)["layout"] == began and len(outputs(db)) > before
    # A flag that changes the layout wins, is said, and is recorded for the next resume.
    r = malt(*run_argv(db, small_model, "--parallel", "8", limit=3))
    assert r.returncode == 0, r.stderr
    (note,) = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert "another KV layout" in note and "parallel 4 (now 8)" in note
    now = stored_config(db)["layout"]
    assert now["parallel"] == 8 and now != began
    r = malt(*run_argv(db, small_model, "--json", limit=3))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["layout"] == now
    assert not any(line.startswith("note:") for line in r.stderr.splitlines())
