"""Shared fixtures.

Every test runs with its own MALT_HOME and no MALT_DB/MALT_MODEL from the caller's shell. The
end-to-end tests use the real SmolLM2-135M model (`make model` fetches it); when it is missing
they fail, never skip, so CI cannot pass without real inference.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, settings

# Property tests (tests/test_fuzz.py, tests/test_question_files_properties.py): "ci", the
# default, is derandomized and bounded (the whole set well under a minute on two cores);
# HYPOTHESIS_PROFILE=fuzz searches longer with fresh examples. No example database is written
# into the checkout.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("fuzz", max_examples=2000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Slices of the benchmark files (tests/data/README.md): the suite reads nothing outside the repo.
TEST_DATA = ROOT / "tests" / "data"
DEFAULT_MODEL = Path.home() / ".cache/malt/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def small_model_path() -> Path:
    return Path(os.environ.get("MALT_TEST_MODEL") or DEFAULT_MODEL)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("malt_home")
    monkeypatch.setenv("MALT_HOME", str(home))
    for var in ("MALT_DB", "MALT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    # --engine openai reads these; a developer's shell must not point tests at a real server.
    for var in ("MALT_ENDPOINTS", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def small_model() -> Path:
    path = small_model_path()
    if not path.is_file():
        pytest.fail(
            f"the small test model is missing at {path}: run `make model` "
            "(or set MALT_TEST_MODEL to SmolLM2-135M-Instruct.Q4_1.gguf)"
        )
    return path


def default_signals() -> None:
    """`preexec_fn` for a child a signal test interrupts: SIGINT and SIGTERM as a shell gives
    them, whatever this suite inherited (a suite started in the background gets SIGINT
    ignored, and so would its children, and Ctrl-C tests would wait forever)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def malt(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m malt_local` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "malt_local", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def run_argv(db, model, *extra, n=2, max_tokens=24, limit=3, questions=None) -> list[str]:
    """`malt run` arguments for a small real run over the example questions."""
    return [
        "run", "--n", str(n), "--max-tokens", str(max_tokens), "--model", str(model),
        "--db", str(db), "--limit", str(limit), *extra,
        str(questions or EXAMPLES / "questions.jsonl"),
    ]  # fmt: skip


# Seeds tried for the shared real run, and the θ it uses: the small model is weak, and its
# outputs differ between CPUs (llama.cpp picks its kernels for the machine it was built on), so
# no one seed gives right and wrong nodes in every role everywhere; θ = 0.2 makes a generator
# positive when one of its four leaves is right.
REAL_RUN_SEEDS = tuple(range(1, 11))
REAL_RUN_THETA = "0.2"


def mixed_labels(db: Path) -> bool:
    """Every role has positive and negative nodes (refiners: right and wrong leaves)."""
    with sqlite3.connect(db) as conn:
        (theta,) = conn.execute("SELECT theta FROM runs").fetchone()
        for role in ("generator", "verifier", "refiner"):
            rows = conn.execute("SELECT reward, value FROM nodes WHERE role = ?", [role])
            labels = {(r == 1.0) if role == "refiner" else (v > theta) for r, v in rows}
            if labels != {True, False}:
                return False
    return True


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, small_model) -> SimpleNamespace:
    """One real n = 2 run over GSM8K and CSQA example questions, shared by read-only tests: the
    first seed whose run has right and wrong nodes in every role, so the export and label checks
    are never vacuous. `argv` re-runs it (a resume)."""
    d = tmp_path_factory.mktemp("real_run")
    env = {"MALT_HOME": str(d / "home")}
    for seed in REAL_RUN_SEEDS:
        db = d / f"malt-{seed}.db"
        argv = run_argv(
            db, small_model, "--seed", str(seed), "--theta", REAL_RUN_THETA, max_tokens=40, limit=4
        )
        r = malt(*argv, env=env)
        assert r.returncode == 0, r.stderr
        if mixed_labels(db):
            return SimpleNamespace(db=db, argv=argv, seed=seed)
    pytest.fail(f"no seed in {REAL_RUN_SEEDS} gave right and wrong nodes in every role")


@pytest.fixture(scope="session")
def real_run_db(real_run) -> Path:
    return real_run.db


@pytest.fixture(scope="session")
def llama_server(small_model, tmp_path_factory):
    """llama.cpp's own llama-server (`make llama-server`) serving the small model on 127.0.0.1
    with four parallel slots, for the `--engine openai` tests. Fails, never skips, without the
    binary; the server is stopped when the session ends."""
    from malt_local.bench.llama_server import LlamaServer
    from malt_local.errors import MaltError

    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    # Flash attention on, a KV stream per slot: as the batched engine runs on a CPU.
    server = LlamaServer(small_model, slots=4, ctx_per_slot=2048, flash_attn=True, log_path=log)
    try:
        server.start()
    except MaltError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()
