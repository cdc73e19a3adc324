"""`malt study`: the protocol in one command, on the real small model at tiny sizes, killed in
every stage and continued; its config, refusals and the split it needs.

The end-to-end test is the one that matters: a study is hours of work on a real model, so the
same command after kill -9 must go on from the stage it was in and redo nothing that finished
(the trees' nodes, the export, the adapters and the test-time turns are each checked unchanged).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from malt_local.errors import MaltError
from malt_local.study.config import StudyConfig, differences, read_toml, to_toml
from malt_local.study.pipeline import STAGES, adapter_configs, resolve_config
from tests.conftest import EXAMPLES, default_signals, malt

TEST_SUMS = [
    ("What is 4 + 1?", 5),
    ("What is 2 + 3?", 5),
    ("What is 7 - 2?", 5),
    ("What is 1 + 8?", 9),
]


def write_sums(path: Path, sums: list[tuple[str, int]]) -> Path:
    lines = [json.dumps({"question": q, "answer": f"#### {a}"}) for q, a in sums]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def study_argv(out: Path, train: Path, test: Path, model: Path) -> list[str]:
    # A 32-token budget cuts most nodes off: kept as positives (--keep-length-stopped) and
    # theta 0.2, so four sums give the roles data; two training steps a stage.
    return [
        "study", "--train", str(train), "--test", str(test), "--model", str(model),
        "--out", str(out), "--n", "2", "--max-tokens", "32", "--theta", "0.2",
        "--keep-length-stopped", "--votes", "2", "--seeds", "2", "--max-steps", "2",
        "--batch-size", "2", "--lr", "1e-3", "--dpo-lr", "1e-4",
    ]  # fmt: skip


# --------------------------------------------------------------------------- config


def test_config_round_trips_through_toml_and_paths_are_taken_from_the_file(tmp_path):
    config = StudyConfig(
        train=str(tmp_path / "a.jsonl"),
        test=str(tmp_path / "b.jsonl"),
        model="smollm2-135m",
        prompts="paper",
        votes=5,
        ablations=False,
        training={"lr": 2e-4, "max_steps": 7},
    )
    path = tmp_path / "study.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    assert read_toml(path) == config
    # Relative paths in a config are relative to its folder, not to where malt runs.
    (tmp_path / "sub").mkdir()
    rel = tmp_path / "sub" / "s.toml"
    rel.write_text('[study]\ntrain = "../a.jsonl"\ntest = "b.jsonl"\nmodel = "m.gguf"\n')
    got = read_toml(rel)
    assert got.train == str(tmp_path / "a.jsonl")
    assert got.test == str(tmp_path / "sub" / "b.jsonl")
    assert got.model == str(tmp_path / "sub" / "m.gguf")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[study]\nvotes = 3\n", "[study] has no setting 'votes'"),
        ("[run]\nn = 'three'\n", "n must be a int"),
        ("[nope]\n", "unknown table [nope]"),
        ("[study\n", "is not TOML"),
    ],
)
def test_a_bad_config_is_one_line(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MaltError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_toml(path)


def test_differences_name_each_contradicting_setting():
    a = StudyConfig(train="t", test="u", model="m", training={"lr": 1e-4})
    b = StudyConfig(train="t", test="u", model="other-alias", n=2, training={"lr": 2e-4})
    # The model is compared by sha256 elsewhere: an alias and its file are one model.
    both = ["n 3 (now 2)", "[train] lr 0.0001 (now 0.0002)"]
    assert differences(a, b) == (both, [])  # every stage counts as begun
    assert differences(a, a) == ([], [])
    # Each setting belongs to the stage that first reads it: the trees read n, training lr.
    assert differences(a, b, {"trees"}) == (["n 3 (now 2)"], ["[train] lr 0.0001 (now 0.0002)"])
    assert differences(a, b, {"trees", "export", "train"}) == (both, [])
    assert differences(a, b, set()) == ([], both)


def test_a_setting_of_a_stage_still_to_come_may_change_and_is_recorded(tmp_path):
    """The DPO learning rate is chosen by a sweep on the finished trees' export: the study takes
    it before training begins, writes it into study.toml and lists the change; never after."""
    out = tmp_path / "study"
    out.mkdir()
    config = StudyConfig(train=str(tmp_path / "t.jsonl"), test=str(tmp_path / "u.jsonl"),
                         model="m", n=2)  # fmt: skip
    (out / "study.toml").write_text(to_toml(config), encoding="utf-8")
    (out / "trees.db").write_bytes(b"")  # the trees have begun
    with pytest.raises(MaltError, match=r"begun with n 2 \(now 3\): use another --out"):
        resolve_config(out, replace(config, n=3))
    wanted = replace(config, votes=5, training={"dpo_lr": 1e-4})
    assert resolve_config(out, wanted) == wanted
    assert read_toml(out / "study.toml") == wanted
    state = json.loads((out / "state.json").read_text())
    assert [c["settings"] for c in state["changes"]] == [
        ["votes 3 (now 5)", "[train] dpo_lr 5e-06 (now 0.0001)"]
    ]
    assert resolve_config(out, wanted) == wanted  # the same again: no change to record
    assert len(json.loads((out / "state.json").read_text())["changes"]) == 1
    (out / "adapters.partial").mkdir()  # training has begun: its settings are the study's
    with pytest.raises(MaltError, match=r"begun with \[train\] dpo_lr 0.0001 \(now 5e-05\)"):
        resolve_config(out, replace(wanted, training={"dpo_lr": 5e-5}))
    assert resolve_config(out, replace(wanted, votes=7)).votes == 7  # the evaluation has not


def test_adapter_configs_are_the_protocol_and_its_ablations():
    manifest = {
        "folder": "/a",
        "adapters": {
            f"{r}-{s}": {"role": r, "stage": s, "gguf": f"{r}-{s}.gguf"}
            for r, s in [("generator", "sft"), ("verifier", "sft"), ("verifier", "dpo")]
        },
    }
    got = adapter_configs(manifest)
    assert got["malt"] == [
        "generator=/a/generator-sft.gguf",
        "verifier=/a/verifier-sft.gguf",
        "verifier=/a/verifier-dpo.gguf",
    ]
    assert got["sft"] == ["generator=/a/generator-sft.gguf", "verifier=/a/verifier-sft.gguf"]
    assert got["verifier"] == ["verifier=/a/verifier-sft.gguf", "verifier=/a/verifier-dpo.gguf"]
    assert "refiner" not in got  # no adapter: nothing to evaluate


# --------------------------------------------------------------------------- refusals


def test_a_test_file_sharing_questions_with_the_train_file_is_refused(tmp_path, small_model):
    train = write_sums(tmp_path / "train.jsonl", [("What is 2 + 2?", 4), ("What is 3+3?", 6)])
    # The same question, other case and spacing: still the same question.
    test = write_sums(tmp_path / "test.jsonl", [("what is  2 + 2?", 4), ("What is 9 + 0?", 9)])
    out = tmp_path / "study"
    r = malt(*study_argv(out, train, test, small_model))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 of the 2 test questions are also train questions" in lines[0]
    assert not out.exists()  # refused before anything was written


def test_a_study_is_not_continued_under_other_settings(tmp_path, small_model):
    train = write_sums(tmp_path / "train.jsonl", [("What is 2 + 2?", 4)])
    test = write_sums(tmp_path / "test.jsonl", [("What is 9 + 0?", 9)])
    out = tmp_path / "study"
    out.mkdir()
    config = StudyConfig(train=str(train), test=str(test), model=str(small_model), n=2)
    (out / "study.toml").write_text(to_toml(config), encoding="utf-8")
    (out / "trees.db").write_bytes(b"")  # the trees, which read n, have begun
    r = malt("study", "--out", str(out), "--n", "3")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"Error: the study in {out} was begun with n 2 (now 3): use another --out for another study"
    )
    r = malt("study", "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and "no study in" in r.stderr


def test_an_interrupted_stage_keeps_its_time_and_the_pieces_add_up(
    tmp_path, small_model, monkeypatch
):
    """A study spread over several sittings reports each stage's whole time: the piece that
    Ctrl-C or SIGTERM cut is added when it is cut, not lost."""
    from malt_local.study import pipeline

    train = write_sums(tmp_path / "train.jsonl", [("What is 2 + 2?", 4)])
    test = write_sums(tmp_path / "test.jsonl", [("What is 9 + 0?", 9)])
    out = tmp_path / "study"
    config = StudyConfig(train=str(train), test=str(test), model=str(small_model))

    def cut(*args):
        time.sleep(0.2)
        raise KeyboardInterrupt

    def trees(*args):
        time.sleep(0.1)
        return {"nodes": 14}

    monkeypatch.setattr(pipeline, "_trees", cut)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_study(out, config)
    piece = json.loads((out / "state.json").read_text())["stages"]["trees"]
    assert piece["interrupted"] == 1 and piece["seconds"] >= 0.2 and not piece.get("finished")
    monkeypatch.setattr(pipeline, "_trees", trees)
    monkeypatch.setattr(pipeline, "_export", cut)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_study(out, config)
    stages = json.loads((out / "state.json").read_text())["stages"]
    assert stages["trees"]["finished"] and stages["trees"]["detail"] == {"nodes": 14}
    assert stages["trees"]["seconds"] >= piece["seconds"] + 0.099  # both pieces (3 decimals)
    assert stages["trees"]["interrupted"] == 1
    assert stages["export"]["interrupted"] == 1 and not stages["export"].get("finished")


# --------------------------------------------------------------------------- the split


def test_questions_split_is_by_id_disjoint_and_independent_of_row_order(tmp_path):
    rows = [json.dumps({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"})
            for a in range(6) for b in range(4)]  # fmt: skip
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(rows) + "\n")
    two = tmp_path / "two.jsonl"
    two.write_text("\n".join(reversed(rows)) + "\n")
    outs = []
    for src in (one, two):
        te, tr = tmp_path / f"{src.stem}-test.jsonl", tmp_path / f"{src.stem}-train.jsonl"
        r = malt("questions", "split", str(src), "--test", "5", "--train", "10",
                 "--test-out", str(te), "--train-out", str(tr))  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append((te.read_text().splitlines(), tr.read_text().splitlines()))
    (test1, train1), (test2, train2) = outs
    assert (len(test1), len(train1)) == (5, 10)
    assert sorted(test1) == sorted(test2) and sorted(train1) == sorted(train2)
    assert not set(test1) & set(train1)
    r = malt("questions", "split", str(one), "--test", "20", "--train", "10",
             "--test-out", str(tmp_path / "a"), "--train-out", str(tmp_path / "b"))  # fmt: skip
    assert r.returncode == 2
    assert "has 24 distinct questions; --test 20 and --train 10 need 30" in r.stderr
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- end to end


def _wait_for(proc: subprocess.Popen, lines: list[str], marker: str, ready) -> None:
    """Read the study's stderr until `marker`, then until `ready()` holds (the stage has begun
    its work), then kill -9 it."""
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            break
    else:
        pytest.fail(f"the study ended before {marker!r}: {''.join(lines)}")
    deadline = time.monotonic() + 900
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # the table is not made yet
        return 0
    finally:
        con.close()


def test_study_end_to_end_killed_in_every_stage_continues_without_redoing(tmp_path, small_model):
    train = EXAMPLES / "sums.jsonl"
    test = write_sums(tmp_path / "test.jsonl", TEST_SUMS)
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "malt_local", *study_argv(out, train, test, small_model)]
    env = {**os.environ, "MALT_HOME": os.environ["MALT_HOME"]}
    ready = {
        "trees": lambda: _count(out / "trees.db", "SELECT count(*) FROM nodes") >= 3,
        "export": lambda: True,
        # A stage's adapter or checkpoint is on disk: training is under way.
        "train": lambda: (
            any((out / "adapters.partial").glob("*/result.json"))
            or any((out / "adapters.partial").glob("*/checkpoints/checkpoint-*"))
        ),
        "eval": lambda: _count(out / "eval.db", "SELECT count(*) FROM eval_generations") >= 3,
        "report": lambda: True,
    }
    marks: dict[str, object] = {}
    for index, stage in enumerate(STAGES):
        proc = subprocess.Popen(
            argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
            preexec_fn=default_signals,
        )  # fmt: skip
        lines: list[str] = []
        _wait_for(proc, lines, f"{stage}: started", ready[stage])
        text = "".join(lines)
        # The stage killed in the run before went on (or had just finished); the stages that
        # finished before that were not run again.
        for earlier in STAGES[: max(index - 1, 0)]:
            assert f"{earlier}: already done" in text, text
        if index:
            killed = STAGES[index - 1]
            assert f"{killed}: already done" in text or f"{killed}: done in" in text, text
        if index == 1:  # the trees finished in the run before: their nodes stay as they were
            marks["nodes"] = _count(out / "trees.db", "SELECT count(*) FROM nodes")
            marks["node_max"] = _count(out / "trees.db", "SELECT max(rowid) FROM nodes")
        if index == 2:
            marks["export"] = (out / "export" / "manifest.json").stat().st_mtime_ns
        if index == 3:
            marks["adapters"] = (out / "adapters" / "manifest.json").stat().st_mtime_ns
    r = malt(*study_argv(out, train, test, small_model), "--json", timeout=1800)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    state = json.loads((out / "state.json").read_text())
    assert all(state["stages"][s]["finished"] for s in STAGES)
    assert state["stages"]["trees"]["started_at"] < state["stages"]["trees"]["finished_at"]
    # Nothing that finished was made again.
    assert marks["nodes"] == 4 * (2 + 4 + 8)
    assert _count(out / "trees.db", "SELECT count(*) FROM nodes") == marks["nodes"]
    assert _count(out / "trees.db", "SELECT max(rowid) FROM nodes") == marks["node_max"]
    assert (out / "export" / "manifest.json").stat().st_mtime_ns == marks["export"]
    assert (out / "adapters" / "manifest.json").stat().st_mtime_ns == marks["adapters"]
    # The evaluation: 4 questions x 2 seeds, 3 turns a pass; base and malt 2 passes, the
    # ablations one (each configuration whose role has an adapter).
    configs = results["eval"]["configs"]
    ablations = [c for c in configs if c not in ("base", "malt")]
    turns = _count(out / "eval.db", "SELECT count(*) FROM eval_generations")
    assert turns == 8 * 3 * 2 * 2 + 8 * 3 * len(ablations)
    # The report: every measure of the headline comparison, paired over 8 question-seeds.
    headline = {c["measure"]: c for c in results["eval"]["comparisons"] if c["config"] == "malt"}
    assert set(headline) == {"sa", "sa_mv", "ma", "ma_mv"}
    for c in headline.values():
        assert c["n"] == 8 and c["questions"] == 4
        assert c["ci"][0] <= c["diff"] <= c["ci"][1]
    base = configs["base"]["accuracy"]["ma_mv"]
    assert headline["ma_mv"]["base"] == pytest.approx(base)
    assert (out / "REPORT.md").read_text().count("MA+MV") >= 1
    assert {p.name for p in (out / "figures").iterdir()} >= {"accuracy.svg"}
    assert results["model"]["sha256"] == state["model"]["sha256"]
    assert results["environment"]["malt"] and results["data"]["test"]["questions"] == 4
    assert [s["name"] for s in results["stages"]] == ["trees", "export", "train", "eval"]
    # The training record shows DPO's margins (the verifier and refiner have DPO stages when
    # they have pairs), and a rerun of the finished study does nothing at all.
    r = malt(*study_argv(out, train, test, small_model))
    assert r.returncode == 0, r.stderr
    assert all(f"{s}: already done" in r.stderr for s in STAGES)
    assert _count(out / "eval.db", "SELECT count(*) FROM eval_generations") == turns
