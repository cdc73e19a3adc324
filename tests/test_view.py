"""`malt view` without a browser: read-only storage, HTTP safety, the data behind each page.

The pages themselves are tested in a real Chromium against a real run (test_view_browser.py);
these pin the logic on scripted trees and check every way a user can get the command wrong.
"""

from __future__ import annotations

import json
import socket
import sqlite3
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
