"""Datasets straight from the Hub: `malt pull --dataset`, `hf:` question sources and the column
mapping flags, against the fake Hub on 127.0.0.1 (tests/hubserver.py).

The run and eval tests stop the fake Hub and set HF_HUB_OFFLINE=1 before reading the split, so
they prove that an `hf:` source needs nothing but the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.datasets.fields import FieldMap, defaults_for, map_row
from malt_local.datasets.sources import load_source
from malt_local.datasets.splits import HfSource, splits_of
from malt_local.errors import MaltError
from malt_local.questions.loading import questions_from_rows
from tests import test_pull as pull_tests
from tests.conftest import malt as run_malt
from tests.hubserver import COMMIT, FakeHub

ROOT = Path(__file__).resolve().parent.parent
REPO = "tester/gsm8k-mini"
CUT = 1500
CARD = """---
license: mit
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: test
    path: socratic/test-*
---
# A GSM8K-shaped dataset for malt's tests
"""


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices("abcdefghij", k=rng.randint(3, 9))) for _ in range(n))


def _rows(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "question": f"{split} question {i}: {_words(rng, 25)}?",
            "answer": f"{_words(rng, 12)}\n#### {i * 7 + seed}",
        }
        for i in range(n)
    ]


def _parquet(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, compression="none")
    return buffer.getvalue()


TRAIN = _rows("train", 12, 1)
TEST = _rows("test", 8, 2)
SOCRATIC = _rows("socratic", 3, 3)
FILES = {
    "README.md": CARD.encode(),
    ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
    "main/train-00000-of-00001.parquet": _parquet(TRAIN),
    "main/test-00000-of-00001.parquet": _parquet(TEST),
    "socratic/test-00000-of-00001.parquet": _parquet(SOCRATIC),
    "scripts/make.py": b"print('not data')\n",
}
TEST_FILE = "main/test-00000-of-00001.parquet"


# The private HF cache and MALT_HOME of the model pull's tests, and their helpers.
env = pull_tests.env
one_error_line = pull_tests.one_error_line


@pytest.fixture
def hub(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    with FakeHub() as fake:
        for name, data in FILES.items():
            fake.add_dataset(REPO, name, data)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        env["HF_ENDPOINT"] = fake.url
        yield fake


def malt(*args: str):
    return CliRunner().invoke(cli, list(args))


def malt_process(env: dict[str, str], *args: str, timeout: int = 120):
    """A separate `python -m malt_local` (this checkout's), as a user retyping the command."""
    return run_malt(*args, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=timeout)


def folder(env: dict[str, str], repo: str = REPO) -> Path:
    return Path(env["HF_HUB_CACHE"]) / ("datasets--" + repo.replace("/", "--"))


def resolve_gets(hub: FakeHub) -> list:
    return [g for g in hub.gets() if "/resolve/" in g.path]


# --------------------------------------------------------------------------- pull


def test_pull_dataset_fetches_data_files_into_the_hf_cache(hub: FakeHub, env) -> None:
    result = malt("pull", "--dataset", REPO, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["commit"] == COMMIT and data["revision"] == "main"
    base = folder(env)
    assert data["snapshot"] == str(base / "snapshots" / COMMIT)
    fetched = {f["file"]: f for f in data["files"]}
    # the card and the data files only: no scripts, no .gitattributes
    assert set(fetched) == {
        "README.md",
        "main/train-00000-of-00001.parquet",
        TEST_FILE,
        "socratic/test-00000-of-00001.parquet",
    }
    for name, f in fetched.items():
        snapshot = base / "snapshots" / COMMIT / name
        assert snapshot.is_symlink() and snapshot.read_bytes() == FILES[name]
        assert f["sha256"] == hashlib.sha256(FILES[name]).hexdigest()
        assert f["action"] == "downloaded"
    # LFS files are blobs/<sha256>, the card (kept in git) blobs/<git sha1>, as the Hub's ETags
    card = FILES["README.md"]
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(card) + card).hexdigest()
    assert os.path.realpath(base / "snapshots" / COMMIT / "README.md").endswith(git_sha1)
    sha = hashlib.sha256(FILES[TEST_FILE]).hexdigest()
    assert os.path.realpath(base / "snapshots" / COMMIT / TEST_FILE) == str(base / "blobs" / sha)
    assert (base / "refs" / "main").read_text() == COMMIT
    assert data["sources"] == [
        f"hf:{REPO}/main:train",
        f"hf:{REPO}/main:test",
        f"hf:{REPO}/socratic:test",
    ]
    assert all("/datasets/tester/gsm8k-mini/resolve/" in g.path for g in resolve_gets(hub))

    # again: everything verified in the cache, nothing downloaded
    hub.clear()
    again = malt("pull", "--dataset", REPO)
    assert again.exit_code == 0, again.stderr
    assert resolve_gets(hub) == []
    assert again.stdout.strip() == str(base / "snapshots" / COMMIT)
    assert "main/test-00000-of-00001.parquet: already pulled" in again.stderr
    assert f"questions: hf:{REPO}/main:train" in again.stderr


@pytest.mark.parametrize(
    "at, bad", [(100, "README.md"), (len(CARD) + 200, "main/test-00000-of-00001.parquet")]
)
def test_corrupted_byte_is_refused_and_nothing_half_written(
    hub: FakeHub, env, at: int, bad: str
) -> None:
    hub.faults.flip_byte_at = at
    result = malt("pull", "--dataset", REPO)
    assert result.exit_code == 2
    line = one_error_line(result.stderr.splitlines()[-1])
    kind = "git sha1" if bad == "README.md" else "sha256"
    assert line.startswith(f"Error: {kind} mismatch for {bad}") and "deleted" in line
    base = folder(env)
    assert not (base / "refs").exists()  # not a pulled dataset
    assert not any(p.name.endswith(".incomplete") for p in (base / "blobs").iterdir())
    good = {os.path.realpath(p) for p in (base / "snapshots").rglob("*") if p.is_symlink()}
    assert {Path(p).read_bytes() for p in good} <= set(FILES.values())  # only verified files
    source = f"hf:{REPO}/main:test"
    refused = malt("run", source, "--db", str(Path(env["MALT_HOME"]) / "x.db"))
    assert refused.exit_code == 2 and "is not pulled" in refused.stderr

    hub.faults.flip_byte_at = None
    assert malt("pull", "--dataset", REPO).exit_code == 0
    assert [q.text for q in load_source(source)] == [r["question"] for r in TEST]


def test_cut_download_resumes_in_a_new_process(hub: FakeHub, env) -> None:
    hub.faults.cut_after = CUT
    first = malt_process(env, "pull", "--dataset", REPO)
    assert first.returncode == 2, first.stderr
    line = one_error_line(first.stderr.splitlines()[-1])
    assert f"run `malt pull --dataset {REPO}` again to resume" in line
    base = folder(env)
    partials = list((base / "blobs").glob("*.incomplete"))
    assert [p.stat().st_size for p in partials] == [CUT]
    assert not (base / "refs").exists()

    hub.faults.cut_after = None
    hub.clear()
    second = malt_process(env, "pull", "--dataset", REPO, "--json")
    assert second.returncode == 0, second.stderr
    data = json.loads(second.stdout)
    actions = {f["file"]: (f["action"], f["resumed_from"]) for f in data["files"]}
    assert actions["README.md"] == ("cached", None)
    assert actions["main/test-00000-of-00001.parquet"] == ("resumed", CUT)
    assert f"bytes={CUT}-" in [g.range for g in resolve_gets(hub)]
    assert not list((base / "blobs").glob("*.incomplete"))
    for name, f in {f["file"]: f for f in data["files"]}.items():
        assert Path(f["path"]).read_bytes() == FILES[name]


def test_pinned_revision_and_offline_pull(hub: FakeHub, env, monkeypatch) -> None:
    hub.faults.cut_after = CUT  # a pinned commit's half pull is not a pulled dataset either
    assert malt("pull", "--dataset", f"{REPO}@{COMMIT}").exit_code == 2
    assert (folder(env) / "snapshots" / COMMIT / "README.md").is_file()
    with pytest.raises(
        MaltError, match=f"dataset {REPO} is not pulled; run `malt pull --dataset {REPO}@{COMMIT}`"
    ):
        load_source(f"hf:{REPO}@{COMMIT}/main:train")
    hub.faults.cut_after = None
    result = malt("pull", "--dataset", f"{REPO}@{COMMIT}", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["revision"] == COMMIT
    assert not (folder(env) / "refs" / "main").exists()  # a commit needs no ref
    # the source pins the same commit, offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.stop()
    qs = load_source(f"hf:{REPO}@{COMMIT}/main:train")
    assert [q.ground_truth for q in qs] == [r["answer"].rsplit("#", 1)[1].strip() for r in TRAIN]
    assert malt("pull", "--dataset", f"{REPO}@{COMMIT}").exit_code == 0
    missing = malt("pull", "--dataset", "tester/other")
    assert missing.exit_code == 2 and "HF_HUB_OFFLINE is set" in missing.stderr


@pytest.mark.parametrize(
    "setup, name, expected",
    [
        (None, "tester/absent", "repository 'tester/absent' not found on the Hub"),
        ("gated", REPO, f"{REPO} is a gated repository: accept its licence at http://127.0.0.1:"),
        ("nodata", "tester/cardonly", "tester/cardonly has no data files malt reads"),
        (None, "not a name", "'not a name' is not a Hub dataset id"),
        (None, f"{REPO}@", "nothing after '@'"),
        (None, f"{REPO}@v9", "revision 'v9' not found"),
    ],
)
def test_pull_errors_are_one_line(hub: FakeHub, env, setup, name: str, expected: str) -> None:
    if setup == "gated":
        hub.faults.gated.add(f"datasets/{REPO}")
    if setup == "nodata":
        hub.add_dataset("tester/cardonly", "README.md", b"# nothing\n")
    result = malt("pull", "--dataset", name)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert expected in line
    if setup == "gated":
        assert f"/datasets/{REPO} while logged in" in line
    assert not (folder(env) / "refs").exists()


# --------------------------------------------------------------------------- run and eval


def test_run_and_eval_read_the_pulled_split_offline(hub: FakeHub, env, small_model, tmp_path):
    assert malt("pull", "--dataset", REPO).exit_code == 0
    hub.stop()  # no network from here on
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    source = f"hf:{REPO}/main:test"
    db = tmp_path / "run.db"
    run = malt_process(
        offline,
        *("run", source, "--model", str(small_model), "--db", str(db)),
        *("--limit", "1", "--n", "1", "--max-tokens", "8"),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    with sqlite3.connect(db) as conn:
        stored = conn.execute(
            "SELECT question, ground_truth, task, source FROM questions"
        ).fetchall()
    assert stored == [
        (TEST[0]["question"], "2", "gsm8k", f"{source}:main/test-00000-of-00001.parquet")
    ]

    ev = malt_process(
        offline,
        *("eval", source, "--model", str(small_model), "--db", str(tmp_path / "eval.db")),
        *("--mode", "sa", "--votes", "1", "--samples", "1", "--seeds", "1"),
        *("--max-tokens", "8", "--json"),
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    [bench] = result["benchmarks"]
    assert bench["benchmark"] == source and bench["file"] == source
    assert bench["questions"] == len(TEST) and bench["task"] == "gsm8k"


NOT_PULLED = "dataset tester/absent is not pulled; run `malt pull --dataset tester/absent`"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("hf:tester/absent:test", NOT_PULLED),
        (f"hf:{REPO}/main:dev", f"{REPO} config 'main' has no split 'dev': it has train, test"),
        (f"hf:{REPO}/other:test", f"{REPO} has no config 'other': it has main, socratic"),
        (f"hf:{REPO}:test", f"{REPO} has several configs (main, socratic): name one"),
        ("hf:tester:test", "'hf:tester:test' is not a dataset source"),
    ],
)
@pytest.mark.parametrize("command", ["run", "eval"])
def test_bad_sources_are_one_line_and_write_nothing(
    hub: FakeHub, env, tmp_path, source: str, expected: str, command: str
) -> None:
    assert malt("pull", "--dataset", REPO).exit_code == 0
    db = tmp_path / "x.db"
    result = malt(command, source, "--db", str(db), "--model", str(tmp_path / "no.gguf"))
    assert result.exit_code == 2
    assert expected in one_error_line(result.stderr)
    assert not db.exists()


def test_a_dataset_without_card_follows_the_hub_conventions(hub: FakeHub, env) -> None:
    """MATH-500 as the Hub has it: `test.jsonl` at the top, no configs; its known mapping."""
    rows = [
        {"problem": "What is $1+1$?", "solution": "$\\boxed{2}$", "answer": "2", "level": 1},
        {"problem": "What is $2+3$?", "solution": "$\\boxed{5}$", "answer": "5", "level": 2},
    ]
    repo = "HuggingFaceH4/MATH-500"
    hub.add_dataset(repo, "README.md", b"# MATH-500\n")
    hub.add_dataset(repo, "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert malt("pull", "--dataset", repo).exit_code == 0
    qs = load_source(f"hf:{repo}:test")
    assert [(q.text, q.ground_truth, q.task) for q in qs] == [
        ("What is $1+1$?", "2", "math"),
        ("What is $2+3$?", "5", "math"),
    ]
    assert qs[0].source == f"hf:{repo}:test:test.jsonl" and qs[0].line == 1


def test_convention_splits_and_source_forms(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    for name in (
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/validation-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
        "data/extra.parquet",  # no split name, and others have one: no split
        "dataset_infos.json",  # metadata, not rows
    ):
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(b"")
    assert splits_of(snap) == {
        "default": {
            "train": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
            "validation": ["data/validation-00000-of-00001.parquet"],
            "test": ["data/test-00000-of-00001.parquet"],
        }
    }
    (snap / "only" / "rows.jsonl").parent.mkdir()
    (snap / "only" / "rows.jsonl").write_bytes(b"")
    assert splits_of(snap / "only") == {"default": {"train": ["rows.jsonl"]}}
    assert HfSource.parse("hf:openai/gsm8k/main:test") == HfSource("openai/gsm8k", "test", "main")
    assert HfSource.parse("hf:gsm8k:train") == HfSource("openai/gsm8k", "train")
    assert HfSource.parse("hf:a/b@v1/c:dev") == HfSource("a/b", "dev", "c", "v1")
    assert str(HfSource.parse("hf:a/b@v1/c:dev")) == "hf:a/b@v1/c:dev"


# --------------------------------------------------------------------------- mapping


def test_mapping_flags_on_a_plain_csv(tmp_path: Path) -> None:
    path = tmp_path / "quiz.csv"
    path.write_text("q,a,ground_truth\nWhat is 2+2?,4,wrong\nCapital of France?,Paris,x\n")
    qs = load_source(path, fields=FieldMap(question="q", answer="a"))
    assert [(q.text, q.ground_truth, q.task) for q in qs] == [
        ("What is 2+2?", "4", "exact"),
        ("Capital of France?", "Paris", "exact"),
    ]
    # without the flags the file has no question column
    unmapped = malt("run", str(path), "--db", str(tmp_path / "x.db"))
    assert unmapped.exit_code == 2 and "no question" in unmapped.stderr
    # a mapped column a row lacks: one line naming the row and the flag
    missing = malt("run", str(path), "--question-field", "query", "--db", str(tmp_path / "x.db"))
    assert missing.exit_code == 2
    line = one_error_line(missing.stderr)
    assert f"{path}:2: no field 'query' (set by --question-field)" in line
    assert not (tmp_path / "x.db").exists()
    ev = malt("eval", str(path), "--answer-field", "nope", "--db", str(tmp_path / "x.db"))
    assert ev.exit_code == 2 and "no field 'nope' (set by --answer-field)" in ev.stderr


def test_flags_override_a_known_datasets_defaults(hub: FakeHub, env) -> None:
    assert malt("pull", "--dataset", REPO).exit_code == 0
    hub.add_dataset("openai/gsm8k", "main/test-00000-of-00001.parquet", FILES[TEST_FILE])
    hub.add_dataset("openai/gsm8k", "README.md", CARD.encode())
    assert malt("pull", "--dataset", "openai/gsm8k").exit_code == 0
    with pytest.raises(MaltError, match="no field 'text' \\(set by --question-field\\)"):
        load_source("hf:openai/gsm8k/main:test", fields=FieldMap(question="text"))
    assert len(load_source("hf:openai/gsm8k/main:test")) == len(TEST)


def _as_questions(rows: list[dict]):
    return questions_from_rows([("t", i + 1, r) for i, r in enumerate(rows)], None, "t")


def test_defaults_for_the_known_datasets() -> None:
    gsm8k = {"question": "Natalia sold clips?", "answer": "48 + 24 = 72\n#### 72"}
    q = _as_questions([map_row(gsm8k, defaults_for("openai/gsm8k"))])[0]
    assert (q.text, q.ground_truth, q.task) == ("Natalia sold clips?", "72", "gsm8k")

    csqa = {
        "id": "075e483d21c29a511267ef62bedc0461",
        "question": "The sanctions against the school were a punishing blow?",
        "question_concept": "punishing",
        "choices": {"label": ["A", "B", "C"], "text": ["ignore", "enforce", "authoritarian"]},
        "answerKey": "A",
    }
    q = _as_questions([map_row(csqa, defaults_for("tau/commonsense_qa"))])[0]
    assert (q.ground_truth, q.task, q.options[1]) == ("A", "csqa", ("B", "enforce"))

    math = {"problem": "Find $x$.", "solution": "\\boxed{3}", "answer": "3", "subject": "Algebra"}
    q = _as_questions([map_row(math, defaults_for("HuggingFaceH4/MATH-500"))])[0]
    assert (q.text, q.ground_truth, q.task) == ("Find $x$.", "3", "math")

    mbpp = {
        "task_id": 2,
        "text": "Write a function to find the shared elements.",
        "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
        "test_list": ["assert similar_elements((3, 4), (4, 5)) == (4,)"],
    }
    for name in ("google-research-datasets/mbpp", "mbpp"):
        row = map_row(mbpp, defaults_for(name))
        assert row["question"] == mbpp["text"]
        assert row["test"] == mbpp["test_list"]
        assert row["canonical_solution"] == mbpp["code"]

    humaneval = {
        "task_id": "HumanEval/0",
        "prompt": "def has_close_elements(numbers, threshold):\n",
        "canonical_solution": "    return False\n",
        "test": "def check(candidate):\n    assert candidate([1.0], 0.5) is False\n",
        "entry_point": "has_close_elements",
    }
    for name in ("openai/openai_humaneval", "openai_humaneval"):
        row = map_row(humaneval, defaults_for(name))
        assert row["question"] == humaneval["prompt"] and row["test"] == humaneval["test"]
        assert row["entry_point"] == "has_close_elements"
        assert {k: row[k] for k in humaneval} == humaneval  # the columns kept as they are
    with pytest.raises(MaltError, match="t:1: no field 'text'"):
        map_row({"prompt": "x"}, defaults_for("mbpp"), "t:1")


def test_killed_pull_resumes_in_a_new_process(hub: FakeHub, env) -> None:
    hub.faults.stall_after = CUT  # every file stops after CUT bytes: the card is whole by then
    proc = subprocess.Popen(
        [sys.executable, "-m", "malt_local", "pull", "--dataset", REPO],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
    )
    blobs = folder(env) / "blobs"
    try:
        deadline = time.monotonic() + 30
        while not [p for p in blobs.glob("*.incomplete") if p.stat().st_size == CUT]:
            assert time.monotonic() < deadline, "the pull never wrote the first bytes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (folder(env) / "refs").exists()

    hub.faults.stall_after = None
    hub.release.set()
    hub.clear()
    again = malt_process(env, "pull", "--dataset", REPO, "--json")
    assert again.returncode == 0, again.stderr
    first = {f["file"]: f for f in json.loads(again.stdout)["files"]}[TEST_FILE]
    assert (first["action"], first["resumed_from"]) == ("resumed", CUT)
    assert [g.range for g in resolve_gets(hub) if TEST_FILE in g.path] == [f"bytes={CUT}-"]
    assert Path(first["path"]).read_bytes() == FILES[TEST_FILE]
