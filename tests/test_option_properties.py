"""Every option value of `malt run`, `malt eval` and `malt export` is either taken (exit 0) or
refused in one line (exit 2) before anything is written: never a traceback, never a run row or
an output file left by a refused command.

Values are drawn (hypothesis) and swept (the known edge values of each option): NaN, ±inf, huge
integers, negatives, zero, empty strings and strings with line breaks, quotes and non-ASCII
letters. `run` and `eval` go to the fake OpenAI server (fast); the llama.cpp-only flags are
checked with the real small model, where the check comes before the model loads.

NUL and lone surrogates are not drawn: no shell can pass a NUL in argv, and a surrogate-escaped
argument is a different question (bytes that are not UTF-8) than a bad value.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from malt_local.cli import cli
from malt_local.engines.llama.sizing import MAX_CTX, MIN_CTX
from malt_local.engines.registry import MAX_THREADS, EngineOptions
from malt_local.evaluate.settings import MAX_SAMPLES, MAX_SEEDS, MAX_VOTES, EvalSettings
from tests.conftest import EXAMPLES
from tests.openaiserver import FakeOpenAI

GSM8K = EXAMPLES / "gsm8k.jsonl"
# Bounded: each example of run/eval is a few requests to the fake server.
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HUGE = str(10**22)
INT_EDGES = ["0", "-1", "1", "2", "7", HUGE, "-" + HUGE, str(2**31), str(2**63), "-" + str(2**63),
             "nan", "inf", "", " ", "1.5", "1e3", "0x10", "abc", "٣"]  # fmt: skip
FLOAT_EDGES = ["nan", "-nan", "inf", "-inf", "0", "-0.0", "1", "0.5", "-1", "1e308", "1e309",
               "5e-324", HUGE, "", "abc", "1,5", "0x1p-2"]  # fmt: skip
STRING_EDGES = ["", " ", "a\nb", "a\rb", "x\u2028y", "'\"", "\\", "é", "日本", "-", "--json",
                "../x", "%s", "{}", "a" * 300, "\t", "\x1b[31m"]  # fmt: skip

_ints = st.one_of(
    st.sampled_from(INT_EDGES),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)
_floats = st.one_of(
    st.sampled_from(FLOAT_EDGES),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
# Every printable character but NUL and surrogates, line breaks and escape included.
_text = st.one_of(
    st.sampled_from(STRING_EDGES),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12),
)
# Counts that make work when valid: drawn in range only at the small end, so an example stays
# a few requests (MAX_VOTES itself is checked without running it below).
_small_counts = st.one_of(
    st.sampled_from(INT_EDGES),
    st.integers(max_value=2).map(str),
    st.integers(min_value=MAX_VOTES + 1).map(str),
)

KINDS = {"int": _ints, "float": _floats, "text": _text, "count": _small_counts}

SHARED = {"--temperature": "float", "--top-p": "float", "--top-k": "int",
          "--max-tokens": "int", "--seed": "int", "--task": "text", "--max-in-flight": "int",
          "--request-timeout": "float", "--model-revision": "text", "--model-sha256": "text",
          "--role-model": "text", "--api-key-env": "text", "--model": "text",
          "--endpoint": "text", "--question-field": "text", "--answer-field": "text",
          "--options-field": "text", "--tests-field": "text",
          "--entry-point-field": "text"}  # fmt: skip
RUN_OPTIONS = {**SHARED, "--n": "int", "--theta": "float", "--limit": "int", "--run": "text"}
EVAL_OPTIONS = {**SHARED, "--mode": "text", "--votes": "count", "--samples": "count",
                "--seeds": "count", "--adapter": "text"}  # fmt: skip
EXPORT_OPTIONS = {"--role": "text", "--format": "text", "--theta": "float", "--run": "text",
                  "--valid-fraction": "float", "--max-pairs-per-group": "int",
                  "--out": "text"}  # fmt: skip

_fresh = itertools.count()


# -- what every invocation must satisfy ----------------------------------------------------------


def _rows(db: Path) -> int:
    """Rows a command left in the tables that hold its work (0 when there is no database)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        work = ("runs", "nodes", "run_questions", "eval_runs", "eval_generations", "eval_samples")
        return sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                   for t in work if t in tables)  # fmt: skip
    finally:
        con.close()


def check(result: Result, written: int) -> None:
    """Exit 0, or exit 2 with one `Error:` line, no traceback and nothing written."""
    text = result.output + result.stderr
    assert "Traceback" not in text, text
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert written == 0, f"{written} rows or files written by a refused command: {lines[0]}"


def _listing(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, so a relative --out or --db lands where it is looked for."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _run_argv(url: str, db: Path, extra: list[str]) -> list[str]:
    return ["run", "--engine", "openai", "--endpoint", url, "--model", "fake-model", "--n", "1",
            "--max-tokens", "8", "--limit", "1", "--db", str(db), "--json", *extra,
            str(GSM8K)]  # fmt: skip


def _eval_argv(url: str, db: Path, extra: list[str]) -> list[str]:
    return ["eval", "--engine", "openai", "--endpoint", url, "--model", "fake-model",
            "--mode", "sa", "--votes", "1", "--samples", "1", "--seeds", "1",
            "--max-tokens", "8", "--db", str(db), "--json", *extra, str(GSM8K)]  # fmt: skip


def _invoke_run(server: FakeOpenAI, work: Path, extra: list[str]) -> None:
    db = work / f"run{next(_fresh)}.db"
    before = _listing(work)
    result = CliRunner().invoke(cli, _run_argv(server.url, db, extra))
    check(result, _rows(db) + (len(_listing(work) - before - {db}) if result.exit_code else 0))


def _invoke_eval(server: FakeOpenAI, work: Path, extra: list[str]) -> None:
    db = work / f"eval{next(_fresh)}.db"
    result = CliRunner().invoke(cli, _eval_argv(server.url, db, extra))
    check(result, _rows(db))


@st.composite
def _flags(draw: st.DrawFn, options: dict[str, str], most: int = 3) -> list[str]:
    names = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=most))
    argv: list[str] = []
    for name in names:
        argv += [name, draw(KINDS[options[name]])]
    return argv


# -- malt run ------------------------------------------------------------------------------------


@PROPERTY
@given(extra=_flags(RUN_OPTIONS))
def test_run_takes_or_refuses_every_value(server: FakeOpenAI, work: Path, extra) -> None:
    _invoke_run(server, work, extra)


@pytest.mark.parametrize("option", sorted(RUN_OPTIONS))
def test_run_edge_values(server: FakeOpenAI, work: Path, option: str) -> None:
    kind = RUN_OPTIONS[option]
    edges = {"int": INT_EDGES, "float": FLOAT_EDGES, "text": STRING_EDGES}[kind]
    for value in edges:
        if option == "--n" and value == "7":
            continue  # refused anyway (n <= 6); the bound is checked in eval's sweep
        _invoke_run(server, work, [option, value])


# -- malt eval -----------------------------------------------------------------------------------


@PROPERTY
@given(extra=_flags(EVAL_OPTIONS, most=2))
def test_eval_takes_or_refuses_every_value(server: FakeOpenAI, work: Path, extra) -> None:
    _invoke_eval(server, work, extra)


@pytest.mark.parametrize("option", sorted(EVAL_OPTIONS))
def test_eval_edge_values(server: FakeOpenAI, work: Path, option: str) -> None:
    kind = EVAL_OPTIONS[option]
    edges = {"int": INT_EDGES, "count": INT_EDGES, "float": FLOAT_EDGES, "text": STRING_EDGES}
    for value in edges[kind]:
        if kind == "count" and value == "7":
            continue  # a valid count that only costs time
        _invoke_eval(server, work, [option, value])


def test_eval_counts_are_capped() -> None:
    """--votes, --seeds and --samples are loops: a sane maximum, quoted when exceeded."""
    EvalSettings(votes=MAX_VOTES, seeds=MAX_SEEDS, samples=MAX_SAMPLES).validate()
    for name, most in (("votes", MAX_VOTES), ("seeds", MAX_SEEDS), ("samples", MAX_SAMPLES)):
        with pytest.raises(Exception, match=rf"--{name} must be in \[1, {most}\] \(got {most + 1}"):
            EvalSettings(**{name: most + 1}).validate()


# -- the llama.cpp-only flags --------------------------------------------------------------------


LOCAL_REFUSED = [("--threads", "0"), ("--threads", "-1"), ("--threads", "513"),
                 ("--threads", HUGE), ("--gpu-layers", "-2"), ("--gpu-layers", HUGE),
                 ("--ctx", "100"), ("--ctx", HUGE), ("--ctx", "-1"), ("--parallel", "0"),
                 ("--parallel", HUGE), ("--threads", "nan"), ("--ctx", "1.5")]  # fmt: skip


@pytest.mark.parametrize(("option", "value"), LOCAL_REFUSED)
def test_local_engine_flags_refused_before_the_model_loads(
    work: Path, small_model: Path, option: str, value: str
) -> None:
    db = work / "local.db"
    argv = ["run", "--model", str(small_model), "--n", "1", "--max-tokens", "8", "--limit", "1",
            "--db", str(db), option, value, str(GSM8K)]  # fmt: skip
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    check(result, _rows(db))
    assert value in result.stderr, result.stderr  # the bad value, quoted back


def test_local_engine_flags_in_range_are_taken() -> None:
    """The bounds themselves are taken (a real run with the model is test_run_e2e's)."""
    EngineOptions(max_tokens=8, threads=1, gpu_layers=-1, ctx=MIN_CTX, parallel=1)
    EngineOptions(max_tokens=8, threads=MAX_THREADS, gpu_layers=0, ctx=MAX_CTX)


# -- malt export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trees(server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with complete trees (n = 2, two questions) to export from."""
    db = tmp_path_factory.mktemp("export") / "trees.db"
    argv = _run_argv(server.url, db, ["--n", "2", "--limit", "2"])
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.stderr
    return db


def _invoke_export(trees: Path, work: Path, extra: list[str]) -> None:
    out = work / f"out{next(_fresh)}"
    before = _listing(work)
    size = trees.stat().st_size
    result = CliRunner().invoke(cli, ["export", "--db", str(trees), "--out", str(out), *extra])
    written = len(_listing(work) - before) if result.exit_code else 0
    check(result, written)
    assert trees.stat().st_size == size


@PROPERTY
@given(extra=_flags(EXPORT_OPTIONS))
def test_export_takes_or_refuses_every_value(trees: Path, work: Path, extra) -> None:
    _invoke_export(trees, work, extra)


@pytest.mark.parametrize("option", sorted(EXPORT_OPTIONS))
def test_export_edge_values(trees: Path, work: Path, option: str) -> None:
    kind = EXPORT_OPTIONS[option]
    for value in {"int": INT_EDGES, "float": FLOAT_EDGES, "text": STRING_EDGES}[kind]:
        _invoke_export(trees, work, [option, value])
