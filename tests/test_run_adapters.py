"""`malt run --adapter/--adapters`: each role's nodes made under its LoRA adapters, on the real
small model, with random adapters that change its outputs (tests/test_adapters.py writes them).
The adapters trained by `malt train` are run in tests/test_train.py."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from malt_local.roles import ROLES, tree_size
from tests.conftest import malt
from tests.test_adapters import model_shapes, write_lora

QUESTIONS = [
    {"question": "What is 3 + 5?", "answer": "#### 8"},
    {"question": "What is 6 + 1?", "answer": "#### 7"},
]
N = 2


@pytest.fixture(scope="module")
def loras(tmp_path_factory, small_model) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("run_loras")
    shapes = model_shapes(small_model)
    return {
        "a": write_lora(d / "a.gguf", shapes),
        "b": write_lora(d / "b.gguf", shapes, targets=("attn_k", "attn_output"), seed=1),
    }


@pytest.fixture()
def questions(tmp_path) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def run(db: Path, model: Path, questions: Path, *extra: str):
    return malt(
        "run", "--n", str(N), "--max-tokens", "16", "--model", str(model), "--db", str(db),
        "--seed", "3", *extra, str(questions),
    )  # fmt: skip


def texts(db: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(question id, path) -> (role, output) for every node of the database's only run."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT question_id, path, role, output FROM nodes").fetchall()
    return {(q, p): (role, out) for q, p, role, out in rows}


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_each_role_is_made_with_its_adapters_and_a_resume_keeps_them(
    tmp_path, small_model, loras, questions
):
    # The base model, built role by role as adapters are (a zero scale is the base exactly).
    base_db = tmp_path / "base.db"
    r = run(base_db, small_model, questions, "--adapter", f"verifier={loras['a']}:0")
    assert r.returncode == 0, r.stderr
    db = tmp_path / "adapted.db"
    adapters = ("--adapter", f"verifier={loras['a']}", "--adapter", f"refiner={loras['b']}")
    r = run(db, small_model, questions, *adapters)
    assert r.returncode == 0, r.stderr
    assert f"verifier adapters: {loras['a']}" in r.stdout

    base, adapted = texts(base_db), texts(db)
    assert len(adapted) == len(QUESTIONS) * tree_size(N) and set(adapted) == set(base)
    changed = {role: 0 for role in ROLES}
    for key, (role, out) in adapted.items():
        changed[role] += out != base[key][1]
    # The generator has no adapter: its nodes are the base model's, so every verifier saw the
    # same answer; the verifier's and refiner's adapters change what those roles write.
    assert changed["generator"] == 0, changed
    assert changed["verifier"] > 0 and changed["refiner"] > 0, changed
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM nodes WHERE value IS NULL").fetchone() == (0,)
        (config,) = conn.execute("SELECT config FROM runs").fetchone()
    recorded = json.loads(config)["adapters"]
    assert sorted(recorded) == ["refiner", "verifier"]
    assert all(len(stack) == 1 and stack[0][1] == 1.0 for stack in recorded.values())

    # The same adapters continue the run; other ones (or none) are another run's identity.
    r = run(db, small_model, questions, *adapters, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nodes_generated"] == 0
    swapped = ("--adapter", f"verifier={loras['b']}", "--adapter", f"refiner={loras['a']}")
    for extra in (swapped, (), ("--adapter", f"verifier={loras['a']}:0.5", *adapters[2:])):
        line = one_line_error(run(db, small_model, questions, *extra))
        assert "adapters" in line and "--new-run" in line, line
    assert len(texts(db)) == len(adapted)

    # The export names the adapters its nodes were made with.
    out = tmp_path / "export"
    r = malt("export", "--db", str(db), "--out", str(out), "--keep-length-stopped")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["sources"]
    assert entry["config"]["adapters"] == recorded
    (verifier,) = entry["adapters"]["verifier"]
    assert verifier == {"path": str(loras["a"]), "sha256": recorded["verifier"][0][0], "scale": 1.0}


def train_folder(tmp_path: Path, lora: Path, base_sha: str) -> Path:
    """A folder shaped as `malt train` writes it, holding one verifier adapter."""
    folder = tmp_path / "trained"
    folder.mkdir()
    shutil.copy(lora, folder / "verifier-sft.gguf")
    manifest = {
        "tool": "malt-train",
        "base": {"kind": "gguf", "sha256": base_sha},
        "adapters": {"verifier-sft": {"gguf": "verifier-sft.gguf"}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_adapters_trained_on_another_model_are_refused_unless_allowed(
    tmp_path, small_model, loras, questions
):
    folder = train_folder(tmp_path, loras["a"], "0" * 64)
    db = tmp_path / "malt.db"
    line = one_line_error(run(db, small_model, questions, "--adapters", str(folder)))
    assert "were trained on the model with sha256 000000000000" in line, line
    assert not db.exists()
    r = run(db, small_model, questions, "--adapters", str(folder), "--allow-mismatch", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["nodes_total"] == len(QUESTIONS) * tree_size(N)
    assert list(summary["config"]["adapters"]) == ["verifier"]


def test_bad_adapter_flags_write_nothing(tmp_path, small_model, loras, questions):
    db = tmp_path / "malt.db"
    for extra, message in (
        (("--adapter", f"critic={loras['a']}"), "unknown role 'critic'"),
        (("--adapter", f"verifier={tmp_path / 'nope.gguf'}"), "file not found"),
        (("--adapter", f"verifier={small_model}"), "is a model, not a LoRA adapter"),
        (("--adapters", str(tmp_path)), "no manifest.json"),
        # A typo is refused before any server is asked (adapters through a server:
        # tests/test_served_adapters.py).
        (
            ("--adapter", f"critic={loras['a']}", "--engine", "openai", "--endpoint",
             "http://127.0.0.1:9"),
            "unknown role 'critic'",
        ),
    ):  # fmt: skip
        line = one_line_error(run(db, small_model, questions, *extra))
        assert message in line, line
    assert not db.exists()
