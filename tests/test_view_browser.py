"""`malt view` in a real headless Chromium, against a database a real small-model run made.

The browser is Debian's `chromium` (`make browser` installs it; `make test` depends on it),
driven by Playwright's Python package through `executable_path`. It is never skipped: without
the browser these tests fail and say how to install it.

One module fixture builds the data with the real CLI: a copy of the suite's real `malt run`
(n = 2, SmolLM2-135M, `real_run_db`) and a real `malt eval` into it; one question's text and
one refiner output are then overwritten with a `<script>` and an `onerror=` attribute, as a
questions file or a model could write them. `malt view` runs as a subprocess, as a user starts
it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import EXAMPLES, ROOT, malt

VIEW_DATA = ROOT / "tests" / "data" / "view"
ROLES = ("generator", "verifier", "refiner")
PLANTED_OUTPUT = (
    "<script>document.title='pwned';window.pwned=3</script>"
    '<img src=x onerror="window.pwned=4"> Final Answer: 7'
)
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str:
    env = os.environ.get("MALT_CHROMIUM")
    for path in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if path and Path(path).is_file():
            return path
    pytest.fail(
        "no Chromium for the browser tests: run `make browser` (apt-get install chromium) "
        "or set MALT_CHROMIUM to a chromium binary"
    )


def rows(db: Path, sql: str, args=()) -> list[dict]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


class View:
    """`malt view` in a subprocess on a free port; `url` is what it printed."""

    def __init__(self, db: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "malt_local", "view", "--db", str(db), "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line.startswith("http://127.0.0.1:"), line
        self.url = line.rstrip("/")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def real(tmp_path_factory, small_model, real_run):
    """A copy of the suite's shared real run (which has right and wrong nodes in every role),
    a real `malt eval` added to it, and planted markup in one question and one output."""
    d = tmp_path_factory.mktemp("view")
    env = {"MALT_HOME": str(d / "home")}
    db = d / "malt.db"
    copy_db(real_run.db, db)
    r = malt(
        "eval", str(EXAMPLES / "gsm8k.jsonl"), "--samples", "1", "--seeds", "2", "--votes", "2",
        "--max-tokens", "12", "--model", str(small_model), "--db", str(db), "--json", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    evaluation = json.loads(r.stdout)
    (run,) = rows(db, "SELECT id FROM runs")
    first = rows(db, "SELECT question_id FROM run_questions ORDER BY position LIMIT 1")[0][
        "question_id"
    ]
    planted = json.loads((VIEW_DATA / "planted.jsonl").read_text(encoding="utf-8"))["question"]
    # The planted markup, as a questions file or a model could have written it.
    leaf = rows(db, "SELECT id, question_id FROM nodes WHERE depth = 3 ORDER BY id LIMIT 1")[0]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE questions SET question = ? WHERE id = ?", [planted, first])
        conn.execute("UPDATE nodes SET output = ? WHERE id = ?", [PLANTED_OUTPUT, leaf["id"]])
    conn.close()
    view = View(db, "--train", str(VIEW_DATA / "train_manifest.json"))
    yield SimpleNamespace(
        db=db,
        dir=d,
        env=env,
        # The arguments that made the shared real run, on this copy: re-running them resumes it.
        argv=[str(db) if a == str(real_run.db) else a for a in real_run.argv],
        run_id=run["id"],
        eval=evaluation,
        planted_question=first,
        planted_leaf=leaf,
        view=view,
    )
    view.stop()


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy through SQLite's backup API (the source may be in WAL mode)."""
    a = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    b = sqlite3.connect(dst)
    a.backup(b)
    b.execute("PRAGMA journal_mode = WAL")
    a.close()
    b.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught exceptions."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()


def visit(page, url: str) -> None:
    response = page.goto(url)
    assert response is not None and response.status == 200, url
    assert page.errors == [], (url, page.errors)


def question_ids(real) -> list[str]:
    return [
        r["question_id"]
        for r in rows(
            real.db,
            "SELECT question_id FROM run_questions WHERE run_id = ? ORDER BY position",
            [real.run_id],
        )
    ]


def test_every_page_loads_without_console_errors(real, page):
    base, rid = real.view.url, real.run_id
    paths = [
        "/",
        f"/run/{rid}",
        f"/run/{rid}/questions",
        f"/run/{rid}/questions?q=apples&task=gsm8k&solved=no&positives=&truncated=yes",
        *[f"/run/{rid}/tree/{q}" for q in question_ids(real)],
        *[f"/run/{rid}/pairs?role={role}" for role in ROLES],
        "/evals",
        "/training",
    ]
    for path in paths:
        visit(page, base + path)
        assert page.locator("h1").count() == 1, path
        assert page.locator("link[rel=stylesheet]").count() == 1
        # The stylesheet applied (CSP allows 'self' styles): the header is dark.
        bg = page.evaluate("getComputedStyle(document.querySelector('header.top')).backgroundColor")
        assert bg == "rgb(29, 36, 48)", path
    assert page.locator("svg").count() == 3  # one loss chart per role
    visit(page, f"{base}/run/{rid}")
    assert page.locator("figure.chart svg").count() == 3
    assert page.locator("meta[http-equiv=refresh]").count() == 0  # the run is complete


def test_tree_page_shows_the_nodes_and_values_in_the_database(real, page):
    for qid in question_ids(real):
        visit(page, f"{real.view.url}/run/{real.run_id}/tree/{qid}")
        nodes = rows(
            real.db,
            "SELECT * FROM nodes WHERE run_id = ? AND question_id = ? ORDER BY id",
            [real.run_id, qid],
        )
        assert len(nodes) == 2 + 4 + 8
        assert page.locator("details.node").count() == len(nodes)
        for role, count in (("generator", 2), ("verifier", 4), ("refiner", 8)):
            assert (
                page.locator(f"#counts [data-role={role}]").inner_text()
                == f"{role} {count}/{count}"
            )
        for node in nodes:
            el = page.locator(f'details.node[data-node-id="{node["id"]}"]')
            summary = el.locator(":scope > summary").inner_text()
            assert f"value {node['value']:.2f}" in summary
            assert ("positive" if node["label"] else "negative") in summary
            answer = node["answer"] if node["answer"] is not None else "—"
            assert f"answer {answer}" in summary
            if node["reward"] is not None:
                assert f"reward {node['reward']:.0f}" in summary
            assert el.locator(":scope > pre.output").text_content() == node["output"]
            parent = el.locator("xpath=ancestor::details[contains(@class,'node')][1]")
            if node["parent_id"]:
                assert parent.get_attribute("data-node-id") == node["parent_id"]
            else:
                assert parent.count() == 0
        # Side by side: one comparison per parent plus the generators'.
        assert page.locator("details.compare").count() == 1 + 2 + 4


def test_pairs_page_shows_exactly_the_pairs_malt_export_writes(real, page):
    out = real.dir / "export"
    # The run's 12-token nodes nearly all stop at the length limit, which export leaves out of
    # the chosen sides by default: compare with both keeping them.
    r = malt("export", "--role", "all", "--format", "dpo", "--out", str(out), "--db", str(real.db),
             "--keep-length-stopped")  # fmt: skip
    assert r.returncode == 0, r.stderr
    total = 0
    for role in ROLES:
        exported = [json.loads(x) for x in (out / f"{role}.dpo.jsonl").read_text().splitlines()]
        prov = [
            json.loads(x) for x in (out / f"provenance/{role}.dpo.jsonl").read_text().splitlines()
        ]
        visit(page, f"{real.view.url}/run/{real.run_id}/pairs?role={role}&keep_length_stopped=1")
        assert "--keep-length-stopped" in page.locator("#pair-count").text_content()
        shown = page.locator("article.pair")
        assert shown.count() == len(exported), role
        for i, (row, p) in enumerate(zip(exported, prov, strict=True)):
            pair = shown.nth(i)
            assert pair.get_attribute("data-chosen-id") == p["chosen_id"]
            assert pair.get_attribute("data-rejected-id") == p["rejected_id"]
            assert pair.locator("pre.chosen").text_content() == row["chosen"][0]["content"]
            assert pair.locator("pre.rejected").text_content() == row["rejected"][0]["content"]
            msgs = pair.locator(".prompt .msg")
            assert [
                {
                    "role": msgs.nth(j).locator(".role").text_content(),
                    "content": msgs.nth(j).locator("pre").text_content(),
                }
                for j in range(msgs.count())
            ] == row["prompt"]
        total += len(exported)
    assert total > 0, "the real run gave no DPO pair at all: the comparison would be vacuous"


def test_planted_script_in_a_question_and_an_output_does_not_run(real, page):
    title_before = None
    targets = [
        (f"/run/{real.run_id}/tree/{real.planted_question}", "<script>document.title='pwned'"),
        (f"/run/{real.run_id}/questions", "<script>document.title='pwned'"),
        (f"/run/{real.run_id}/tree/{real.planted_leaf['question_id']}", PLANTED_OUTPUT),
    ]
    for path, text in targets:
        visit(page, real.view.url + path)
        title_before = title_before or page.title()
        assert "pwned" not in page.title()
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert page.locator("main script, main img").count() == 0
        assert text in page.locator("main").text_content()
    leaf = page.locator(f'details.node[data-node-id="{real.planted_leaf["id"]}"]')
    leaf.locator(":scope > summary").click()  # open it: the text is there, still inert
    assert leaf.locator(":scope > pre.output").inner_text() == PLANTED_OUTPUT
    assert page.evaluate("typeof window.pwned") == "undefined"


def test_evaluation_page_shows_what_malt_eval_reports(real, page, screenshot_dir):
    visit(page, f"{real.view.url}/evals")
    section = page.locator(f'section.eval[data-eval-id="{real.eval["eval_run"]}"]')
    assert section.count() == 1
    (bench,) = real.eval["benchmarks"]
    for column, stat in bench["accuracy"].items():
        cell = section.locator(f'td[data-column="{column}"]').inner_text()
        assert cell == f"{stat['mean']:.2f} ± {stat['std']:.2f}", column
    captions = section.locator("figcaption").all_inner_texts()
    assert [c.split(": ", 1)[1] for c in captions] == [
        "accuracy (mean ± std over 2 seeds)",
        "turn-wise accuracy",
        "self-correction (G answer → R answer)",
    ]
    # Error bars: one per accuracy bar with a nonzero std.
    nonzero = sum(1 for s in bench["accuracy"].values() if s["std"])
    assert section.locator("figure").nth(0).locator("g.err").count() == nonzero
    section.locator("section.charts").screenshot(path=str(screenshot_dir / "view-evaluation.png"))


def test_screenshot_of_the_tree_page(real, page, screenshot_dir):
    qid = question_ids(real)[2]  # neither the planted question nor the live test's
    visit(page, f"{real.view.url}/run/{real.run_id}/tree/{qid}")
    page.locator("details.compare").first.locator("summary").click()
    page.screenshot(path=str(screenshot_dir / "view-tree.png"))
    assert (screenshot_dir / "view-tree.png").stat().st_size > 10_000


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    """Where screenshots go: $MALT_SCREENSHOTS (`make screenshots` sets docs/), else tmp."""
    target = os.environ.get("MALT_SCREENSHOTS")
    path = (
        (ROOT / target) if target and not Path(target).is_absolute() else Path(target or tmp_path)
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_page_opened_during_a_run_shows_new_nodes_after_a_reload(real, page, small_model):
    """Nodes deleted as if the run had been killed; `malt run` resumes while the view serves."""
    db = real.dir / "live.db"
    copy_db(real.db, db)
    qid = question_ids(real)[1]
    prefix = f"{real.run_id}/{qid}/1"
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM nodes WHERE id = ? OR id LIKE ?", [prefix, prefix + ".%"])
    conn.close()
    missing = {f"{prefix}{s}" for s in ("", ".0", ".1", ".0.0", ".0.1", ".1.0", ".1.1")}
    view = View(db)
    try:
        visit(page, f"{view.url}/run/{real.run_id}/tree/{qid}")
        assert page.locator("details.node").count() == 14 - 7
        assert page.locator("#counts .total").inner_text() == "7/14 nodes"
        visit(page, f"{view.url}/run/{real.run_id}")
        assert page.locator("meta[http-equiv=refresh]").count() == 1  # reloads while running
        assert "still running" in page.locator("#progress").inner_text()

        argv = [a if a != str(real.db) else str(db) for a in real.argv]
        proc = subprocess.Popen(
            [sys.executable, "-m", "malt_local", *argv],
            env={**os.environ, **real.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 1200
        while proc.poll() is None and time.monotonic() < deadline:
            page.reload()  # the server reads while the run writes
            assert page.errors == []
            time.sleep(0.3)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()

        visit(page, f"{view.url}/run/{real.run_id}/tree/{qid}")
        assert page.locator("#counts .total").inner_text() == "14/14 nodes"
        for nid in missing:
            assert page.locator(f'details.node[data-node-id="{nid}"]').count() == 1
        visit(page, f"{view.url}/run/{real.run_id}")
        assert page.locator("meta[http-equiv=refresh]").count() == 0
    finally:
        view.stop()
