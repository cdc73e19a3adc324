"""`malt view` without a browser: read-only storage, HTTP safety, the data behind each page.

The pages themselves are tested in a real Chromium against a real run (test_view_browser.py);
these pin the logic on scripted trees and check every way a user can get the command wrong.
"""

from __future__ import annotations

import html
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from malt_local.db.store import Store
from malt_local.errors import MaltError
from malt_local.evaluate.settings import EvalSettings
from malt_local.export.options import ExportOptions
from malt_local.export.pipeline import export
from malt_local.roles import ROLES
from malt_local.view import data
from malt_local.view.server import CSP, ViewServer, is_loopback
from tests.conftest import ROOT, malt
from tests.fakes import FakeEngine
from tests.test_eval import gsm_file, make_runner  # noqa: F401 (gsm_file is a fixture)
from tests.test_eval import scripted as eval_script
from tests.test_export import GOLD_A, Q_A, Q_B, build

VIEW_DATA = ROOT / "tests" / "data" / "view"


@pytest.fixture
def gold_db(tmp_path) -> Path:
    db = tmp_path / "gold.db"
    build(db, [Q_A, Q_B], {Q_A.id: GOLD_A, Q_B.id: {"0.0.0"}}).close()
    return db


@pytest.fixture
def server(gold_db):
    srv = ViewServer(gold_db, "127.0.0.1", 0, VIEW_DATA / "train_manifest.json")
    srv.serve_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(url: str, method: str = "GET", headers: dict | None = None):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


# --------------------------------------------------------------------------- read-only


def test_read_only_store_refuses_every_write(gold_db):
    store = Store.read_only(gold_db)
    try:
        assert store.db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 2 * 39
        for sql in (
            "UPDATE nodes SET value = 0",
            "DELETE FROM nodes",
            "INSERT INTO runs (id) VALUES ('x')",
            "CREATE TABLE t (x)",
        ):
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                store.db.execute(sql)
    finally:
        store.close()
    assert Store(gold_db).db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 2 * 39


def test_read_only_store_reads_while_a_writer_holds_the_database(gold_db):
    writer = Store(gold_db)
    writer.db.execute("BEGIN IMMEDIATE")
    writer.db.execute("UPDATE nodes SET value = 0.25 WHERE path = '0'")
    reader = Store.read_only(gold_db)
    try:
        # WAL: the reader sees the last committed state while the write is open.
        values = {r[0] for r in reader.db.execute("SELECT value FROM nodes WHERE path = '0'")}
        assert 0.25 not in values
        writer.db.execute("COMMIT")
        values = {r[0] for r in reader.db.execute("SELECT value FROM nodes WHERE path = '0'")}
        assert values == {0.25}
    finally:
        reader.close()
        writer.close()


def test_read_only_store_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(MaltError, match="no database at"):
        Store.read_only(tmp_path / "none.db")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(MaltError, match="not a malt database"):
        Store.read_only(other)
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite at all, just text " * 50)
    with pytest.raises(MaltError, match="not a malt database"):
        Store.read_only(junk)
    assert junk.read_text().startswith("not sqlite")


# --------------------------------------------------------------------------- the command


def test_cli_errors_are_one_line_exit_2(tmp_path, gold_db):
    r = malt("view", "--db", str(tmp_path / "missing.db"), "--port", "0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"Error: no database at {tmp_path / 'missing.db'} (run `malt run` first, or pass --db)"
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = malt("view", "--db", str(gold_db), "--port", str(port))
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
    r = malt("view", "--db", str(gold_db), "--port", "70000")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_non_loopback_host_gets_a_warning(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert not is_loopback("example.com")
    r = malt("view", "--host", "0.0.0.0", "--db", str(tmp_path / "missing.db"))
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("warning: listening on 0.0.0.0, not a loopback address")
    assert r.returncode == 2


# --------------------------------------------------------------------------- HTTP


def test_every_page_sends_the_strict_headers(server):
    base = server.url.rstrip("/")
    for path in (
        "/",
        "/run/rgold",
        "/run/rgold/questions",
        f"/run/rgold/tree/{Q_A.id}",
        "/run/rgold/pairs?role=refiner",
        "/evals",
        "/training",
        "/nowhere",
    ):
        status, headers, body = fetch(base + path)
        assert status == (404 if path == "/nowhere" else 200), (path, body[:300])
        assert headers["Content-Security-Policy"] == CSP
        assert "script-src 'none'" in CSP and "unsafe-inline" not in CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "<script" not in body.lower()


def test_http_refuses_writes_foreign_hosts_and_unknown_files(server):
    base = server.url.rstrip("/")
    assert fetch(base + "/", method="POST")[0] == 405
    assert fetch(base + "/run/rgold", method="DELETE")[0] == 405
    status, _, body = fetch(base + "/", headers={"Host": "attacker.example:8000"})
    assert status == 400 and "unexpected Host" in body
    assert fetch(base + "/", headers={"Host": "localhost:1234"})[0] == 200
    assert fetch(base + "/static/view.css")[0] == 200
    assert fetch(base + "/static/../server.py")[0] == 404
    assert fetch(base + "/static/%2e%2e/server.py")[0] == 404
    assert fetch(base + "/run/nope")[0] == 404
    assert fetch(base + "/run/rgold/tree/qnope")[0] == 404
    assert fetch(base + "/run/rgold/pairs?role=critic")[0] == 400
    assert fetch(base + "/run/rgold/questions?solved=maybe")[0] == 400


# --------------------------------------------------------------------------- page data


def test_pairs_are_the_exported_pairs(gold_db, tmp_path):
    out = tmp_path / "export"
    export(gold_db, out, ExportOptions(formats=("dpo",)))
    store = Store.read_only(gold_db)
    try:
        for role in ROLES:
            shown = data.pairs(store, "rgold", role)
            rows = [json.loads(x) for x in (out / f"{role}.dpo.jsonl").read_text().splitlines()]
            prov = [
                json.loads(x)
                for x in (out / f"provenance/{role}.dpo.jsonl").read_text().splitlines()
            ]
            assert len(shown["pairs"]) == len(rows) > 0
            for pair, row, p in zip(shown["pairs"], rows, prov, strict=True):
                assert (pair.chosen.id, pair.rejected.id) == (p["chosen_id"], p["rejected_id"])
                assert pair.prompt == row["prompt"]
                assert [{"role": "assistant", "content": pair.chosen.output}] == row["chosen"]
                assert [{"role": "assistant", "content": pair.rejected.output}] == row["rejected"]
        # A page of them: the same pairs, counted in full.
        full = data.pairs(store, "rgold", "refiner")["pairs"]
        page = data.pairs(store, "rgold", "refiner", start=2, limit=3)
        assert page["total"] == len(full) == 8
        assert [(x.chosen.id, x.rejected.id) for x in page["pairs"]] == [
            (x.chosen.id, x.rejected.id) for x in full[2:5]
        ]
        # --theta relabels the same way export does.
        export(gold_db, out, ExportOptions(formats=("dpo",), theta=0.2))
        rows = (out / "verifier.dpo.jsonl").read_text().splitlines()
        assert len(data.pairs(store, "rgold", "verifier", theta=0.2)["pairs"]) == len(rows)
    finally:
        store.close()


def test_question_filters(gold_db):
    store = Store.read_only(gold_db)
    try:

        def ids(**kw):
            return [r["id"] for r in data.questions(store, "rgold", data.QuestionFilter(**kw))]

        assert ids() == [Q_A.id, Q_B.id]
        assert ids(solved=True) == [Q_A.id, Q_B.id]
        assert ids(search="more") == [Q_B.id]
        assert ids(search=Q_A.id[:6]) == [Q_A.id]
        assert ids(search="100%") == []
        assert ids(task="csqa") == []
        assert ids(truncated=True) == []
        assert ids(truncated=False, positives=True) == [Q_A.id, Q_B.id]
    finally:
        store.close()
    with sqlite3.connect(gold_db) as conn:
        conn.execute(
            "UPDATE nodes SET finish_reason = 'length' WHERE id = ?", [f"rgold/{Q_B.id}/1"]
        )
        conn.execute("UPDATE nodes SET reward = 0 WHERE question_id = ?", [Q_B.id])
    store = Store.read_only(gold_db)
    try:
        flt = data.QuestionFilter
        assert [r["id"] for r in data.questions(store, "rgold", flt(truncated=True))] == [Q_B.id]
        assert [r["id"] for r in data.questions(store, "rgold", flt(solved=False))] == [Q_B.id]
    finally:
        store.close()


def test_tree_data_has_every_node_under_its_parent(gold_db):
    judged = f"rgold/{Q_A.id}/0.1.2"
    with sqlite3.connect(gold_db) as conn:
        conn.execute(
            "INSERT INTO judgements (node_id, run_id, correctness_score, reasoning_score, "
            "explanation, key_matches, valid, output, model, created_at) "
            "VALUES (?, 'rgold', 0.0, 0.5, 'States 7, not 18.', '[]', 1, '{}', 'judge.gguf', '')",
            [judged],
        )
    conn.close()
    store = Store.read_only(gold_db)
    try:
        t = data.tree(store, "rgold", Q_A.id)
    finally:
        store.close()
    assert t["counts"] == {"generator": 3, "verifier": 9, "refiner": 27}
    assert [g.name for g in t["roots"]] == ["G1", "G2", "G3"]
    assert [v.name for v in t["roots"][1].children] == ["V2.1", "V2.2", "V2.3"]
    leaf = t["roots"][0].children[1].children[2]
    assert (leaf.name, leaf.path, leaf.reward) == ("R1.2.3", "0.1.2", 0.0)
    assert leaf.id == judged and leaf.judgement["explanation"] == "States 7, not 18."
    assert t["roots"][0].children[1].children[1].judgement is None
    assert t["roots"][0].value == pytest.approx(5 / 9)


def test_evaluation_measures_are_evals_own(tmp_path, gsm_file):  # noqa: F811
    settings = EvalSettings(mode="all", votes=3, samples=4, seeds=3)
    store, runner = make_runner(tmp_path, gsm_file, settings, FakeEngine(eval_script))
    runner.execute()
    expected = runner.results()["benchmarks"][0]
    # A question's stored text may differ from what its id hashes (edited, planted): the view
    # must find its generations by the stored id, not by rehashing the text.
    store.db.execute("UPDATE questions SET question = question || ' (edited)'")
    store.close()
    reader = Store.read_only(tmp_path / "e.db")
    try:
        (ev,) = data.evaluations(reader)
    finally:
        reader.close()
    (bench,) = ev["benchmarks"]
    assert ev["votes"] == 3 and bench["seeds"] == 3 and bench["samples"] == 4
    for key in ("accuracy", "turnwise", "self_correction"):
        assert bench[key] == expected[key]
    assert list(bench["accuracy"]) == ["SA", "SA+MV", "MA", "MA+MV"]


def test_training_manifest_minimal_format(tmp_path):
    result = data.training(VIEW_DATA / "train_manifest.json")
    assert sorted(result["curves"]) == ["generator", "refiner", "verifier"]
    assert sorted(result["curves"]["verifier"]) == ["dpo", "sft"]
    assert result["curves"]["generator"]["sft"][0] == (0.0, 2.7)
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "manifest.json").write_text(
        json.dumps({"roles": {"refiner": {"sft": {"log": [{"step": 1, "loss": 2}, {"x": 1}]}}}})
    )
    assert data.training(folder)["curves"] == {"refiner": {"sft": [(1.0, 2.0)]}}
    (folder / "manifest.json").write_text("[1, 2]")
    with pytest.raises(MaltError, match="not a `malt train` manifest"):
        data.training(folder)
    with pytest.raises(MaltError, match="cannot read training manifest"):
        data.training(tmp_path / "nothing")


# --------------------------------------------------------------------------- paper-size runs


@pytest.fixture
def many_db(tmp_path) -> Path:
    """250 complete synthetic trees (the view bench's builder, the real schema)."""
    from malt_local.bench.view import build_database

    db = tmp_path / "many.db"
    build_database(db, 250)
    return db


@pytest.fixture
def many_server(many_db):
    srv = ViewServer(many_db, "127.0.0.1", 0)
    srv.serve_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


def question_rows(body: str) -> list[str]:
    return re.findall(r'<tr data-question-id="([^"]+)"', body)


def test_questions_page_is_paged_and_its_links_walk_every_question(many_server, many_db):
    base = many_server.url.rstrip("/") + "/run/rbench/questions"
    status, _, body = fetch(base)
    assert status == 200
    seen = question_rows(body)
    assert len(seen) == 100 and "250 questions" in body
    while m := re.search(r'<a class="next" href="([^"]+)"', body):
        status, _, body = fetch(base + html.unescape(m.group(1)))
        assert status == 200
        seen += question_rows(body)
    with sqlite3.connect(many_db) as conn:
        order = [
            r[0] for r in conn.execute("SELECT question_id FROM run_questions ORDER BY position")
        ]
    conn.close()
    assert seen == order  # every question once, in run order, over three pages
    # Filters carry over to the next page, and a page past the end is empty, not an error.
    status, _, body = fetch(base + "?solved=yes&start=0")
    assert status == 200 and "solved=yes&amp;start=100" in body
    assert question_rows(fetch(base + "?start=1000")[2]) == []


def test_pairs_pages_walked_by_their_links_are_the_export(many_db):
    store = Store.read_only(many_db)
    try:
        for role in ROLES:
            full = [
                (p.chosen.id, p.rejected.id) for p in data.pairs(store, "rbench", role)["pairs"]
            ]
            walked, after = [], ""
            pages_seen = 0
            while True:
                page = data.pairs_page(store, "rbench", role, after=after, limit=40)
                walked += [(p.chosen.id, p.rejected.id) for p in page["pairs"]]
                pages_seen += 1
                if page["next"] is None:
                    break
                after = page["next"]
            assert walked == full and len(full) > 40 and pages_seen > 1, role
    finally:
        store.close()


def test_pairs_page_links_go_on_where_the_page_stops(many_server):
    base = many_server.url.rstrip("/") + "/run/rbench/pairs"
    status, _, body = fetch(base + "?role=refiner")
    assert status == 200
    first = re.findall(r'data-chosen-id="([^"]+)"', body)
    m = re.search(r'<a class="next" href="([^"]+)"', body)
    assert m and len(first) >= 100
    status, _, body = fetch(base + html.unescape(m.group(1)))
    second = re.findall(r'data-chosen-id="([^"]+)"', body)
    assert status == 200 and second and not set(first) & set(second)
    assert f"pairs {len(first) + 1}–" in body and "first page" in body


def test_run_figures_are_malt_status_figures(gold_db):
    from malt_local.run.status import run_status

    with sqlite3.connect(gold_db) as conn:  # one tree incomplete, one node unvalued
        conn.execute("DELETE FROM nodes WHERE id = ?", [f"rgold/{Q_B.id}/2.2.2"])
        conn.execute(
            "UPDATE nodes SET value = NULL, label = NULL WHERE id = ?", [f"rgold/{Q_B.id}/2"]
        )
    conn.close()
    store = Store.read_only(gold_db)
    try:
        row = store.run("rgold")
        want = run_status(store, row)
        got = data.run_figures(store, row)["run"]
        for key, value in got.items():
            if key == "roles":
                for role, figures in value.items():
                    assert figures == {k: want["roles"][role][k] for k in figures}, role
            else:
                assert value == want[key], key
        # From the covering index, not the rows.
        plan = " ".join(
            r[3]
            for r in store.db.execute(
                "EXPLAIN QUERY PLAN SELECT role, value, completion_tokens, finish_reason, "
                "label, correct, reward, COUNT(*) FROM nodes WHERE run_id = ? GROUP BY role, "
                "value, completion_tokens, finish_reason, label, correct, reward",
                ["rgold"],
            )
        )
        assert "COVERING INDEX nodes_figures" in plan and "TEMP B-TREE" not in plan
    finally:
        store.close()


def test_run_page_sees_new_values_and_nodes_after_it_was_shown(server, gold_db):
    url = server.url + "run/rgold"
    before = fetch(url)[2]
    assert "78/78 nodes" in before
    with sqlite3.connect(gold_db) as conn:  # values withdrawn, as a judge pass is about to
        conn.execute("UPDATE nodes SET value = NULL, label = NULL WHERE depth = 1")
    conn.close()
    after = fetch(url)[2]
    assert after != before and "still running" not in after
    row = re.search(r'<tr data-role="generator">(.*?)</tr>', after, re.S).group(1)
    assert '<td class="num">0/0</td>' in row  # no generator labelled any more


# --------------------------------------------------------------------------- no 500s


def test_invalid_utf8_in_stored_text_is_shown_with_the_replacement_character(server, gold_db):
    with sqlite3.connect(gold_db) as conn:
        conn.execute(
            "UPDATE nodes SET output = CAST(X'4f6b20ff20656e64' AS TEXT) WHERE id = ?",
            [f"rgold/{Q_A.id}/0"],
        )
        conn.execute(
            "UPDATE questions SET question = CAST(X'517ff0283f' AS TEXT) || question WHERE id = ?",
            [Q_A.id],
        )
    conn.close()
    base = server.url.rstrip("/")
    for path in (
        f"/run/rgold/tree/{Q_A.id}",
        "/run/rgold/questions",
        "/run/rgold/pairs?role=generator",
        "/run/rgold",
        "/",
    ):
        status, _, body = fetch(base + path)
        assert status == 200, (path, body[:300])
    assert "Ok \ufffd end" in fetch(base + f"/run/rgold/tree/{Q_A.id}")[2]
    assert "\ufffd" in fetch(base + "/run/rgold/questions")[2]


def test_bad_numbers_long_searches_and_odd_hosts_are_400s(server):
    base = server.url.rstrip("/")
    for path in (
        "/run/rgold/questions?start=%C2%B2",  # '²': str.isdigit() says yes, int() says no
        "/run/rgold/questions?start=-1",
        "/run/rgold/questions?start=" + "9" * 30,
        "/run/rgold/pairs?role=refiner&from=%C2%B2",
        "/run/rgold/pairs?role=refiner&theta=nan",
        "/run/rgold/pairs?role=refiner&after=..%2F..",
        "/run/rgold/pairs?role=refiner&keep_length_stopped=yes",
        "/run/rgold/questions?q=" + "a" * 50_000,
    ):
        status, _, body = fetch(base + path)
        assert status == 400, (path[:80], status, body[:300])
        assert "must be" in body or "at most" in body
    status, _, body = fetch(base + "/", headers={"Host": "[::1"})
    assert status == 400 and "unexpected Host" in body


def test_a_nan_loss_in_a_training_manifest_is_a_gap_not_a_500(tmp_path, gold_db):
    (tmp_path / "manifest.json").write_text(
        '{"roles": {"refiner": {"sft": {"log": [{"step": 1, "loss": 2.0}, {"step": 2, '
        '"loss": NaN}, {"step": 3, "loss": Infinity}, {"step": 4, "loss": 1.5}, '
        '{"step": 1' + "0" * 400 + ', "loss": 1.0}]}}}}'
    )
    srv = ViewServer(gold_db, "127.0.0.1", 0, tmp_path)
    srv.serve_in_thread()
    try:
        status, _, body = fetch(srv.url + "training")
    finally:
        srv.shutdown()
        srv.server_close()
    assert status == 200 and "<svg" in body
    assert data.training(tmp_path)["curves"] == {"refiner": {"sft": [(1.0, 2.0), (4.0, 1.5)]}}


# --------------------------------------------------------------------------- read-only media


@pytest.fixture
def read_only_copy(gold_db, tmp_path):
    """The database, WAL mode, alone in a folder nobody can write (no -wal, no -shm)."""
    folder = tmp_path / "media"
    folder.mkdir()
    src = sqlite3.connect(gold_db)
    dst = sqlite3.connect(folder / "malt.db")
    src.backup(dst)
    src.close()
    assert dst.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    dst.close()
    for extra in ("malt.db-wal", "malt.db-shm"):
        (folder / extra).unlink(missing_ok=True)
    folder.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:  # root writes through permissions: make the folder immutable
        immutable = (
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        )
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.fail("cannot make a folder read-only here (root without chattr +i)")
        yield folder / "malt.db"
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_view_and_status_open_a_wal_database_on_read_only_media(read_only_copy):
    proc = subprocess.Popen(
        [sys.executable, "-m", "malt_local", "view", "--db", str(read_only_copy), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), proc.stderr.read() if proc.poll() is not None else url
        status, _, body = fetch(url + "run/rgold")
        assert status == 200 and "78/78 nodes" in body
        status, _, body = fetch(url + f"run/rgold/tree/{Q_A.id}")
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r = malt("status", "--db", str(read_only_copy), "--json")
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)["runs"]
    assert run["nodes"] == 78
    r = malt("show", Q_A.id, "--db", str(read_only_copy))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in read_only_copy.parent.iterdir()) == ["malt.db"]
