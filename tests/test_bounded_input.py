"""Bounded memory on input: huge or endless question files and huge questions cost a line, not
gigabytes (issue 23).

A 200 MB question once grew `malt run` to 19.9 GB (it was tokenized whole before the too-long
check), and a question file linked to `/dev/zero` ended in a MemoryError. Files are now read in
chunks up to `MAX_FILE_BYTES`, each field is bounded by `MAX_FIELD_CHARS`, and a question's
length is measured on doubling prefixes, all before anything is written.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.errors import MaltError
from malt_local.prompts import PromptSet, TreeContext
from malt_local.questions import formats
from malt_local.questions.formats import read_bounded, read_rows
from malt_local.questions.loading import Question, question_id
from malt_local.run import too_long
from malt_local.run.too_long import FIRST_PREFIX_CHARS, find_too_long
from tests.conftest import ROOT, malt

# -- the file limit -----------------------------------------------------------------------------


def test_a_file_over_the_limit_is_refused_naming_the_file_and_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_FILE_BYTES", 1024)
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(b"x" * 1024)
    assert read_bounded(ok) == b"x" * 1024  # exactly the limit is accepted
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 1025)
    with pytest.raises(MaltError) as err:
        read_bounded(big)
    assert str(big) in err.value.message and "larger than 1 KiB" in err.value.message
    assert "\n" not in err.value.message


def test_an_endless_source_is_refused_without_being_read_whole(tmp_path, monkeypatch):
    """/dev/zero reports size 0; a FIFO has no size: the chunked read stops at the limit."""
    monkeypatch.setattr(formats, "MAX_FILE_BYTES", 3 << 20)
    monkeypatch.setattr(formats, "_CHUNK_BYTES", 1 << 20)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    with pytest.raises(MaltError, match="larger than 3 MiB"):
        read_rows(zero)

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    written = []

    def endless_writer() -> None:
        try:
            with open(fifo, "wb", buffering=0) as f:
                while True:
                    f.write(b"{}\n" * 4096)
                    written.append(1)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=endless_writer, daemon=True)
    writer.start()
    with pytest.raises(MaltError, match="pipe.jsonl is larger than 3 MiB"):
        read_rows(fifo)
    writer.join(timeout=10)
    assert not writer.is_alive()  # the reader closed the pipe: the writer was told, and stopped


def test_malt_run_on_a_link_to_dev_zero_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_FILE_BYTES", 4 << 20)
    link = tmp_path / "q.jsonl"
    link.symlink_to("/dev/zero")
    db = tmp_path / "malt.db"
    args = ["run", "--model", str(tmp_path / "none.gguf"), "--db", str(db), str(link)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert f"{link} is larger than 4 MiB" in r.stderr
    assert not db.exists()


# -- the field limit ----------------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> None:
    """`rows` in the format `path`'s suffix names, as the usual tools write them."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        lines = [f"question{sep}answer"] + [f"{r['question']}{sep}{r['answer']}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".txt":
        path.write_text("".join(f"{r['question']}\t{r['answer']}\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


# The second row's line or row number in each format (CSV: the header is line 1).
SECOND_ROW = {".jsonl": 2, ".json": 2, ".csv": 3, ".tsv": 3, ".txt": 2, ".parquet": 2}


@pytest.mark.parametrize("suffix", list(SECOND_ROW))
@pytest.mark.parametrize("field", ["question", "answer"])
def test_a_field_over_the_limit_names_file_and_row(tmp_path, monkeypatch, suffix, field):
    monkeypatch.setattr(formats, "MAX_FIELD_CHARS", 100)
    fits = {"question": "q" * 100, "answer": "7"}
    path = tmp_path / f"q{suffix}"
    _write(path, [fits, {**fits, field: "x" * 101}])
    with pytest.raises(MaltError) as err:
        read_rows(path)
    message = err.value.message
    assert message.startswith(f"{path}:{SECOND_ROW[suffix]}: field '{field}' holds 101 characters")
    assert "over the limit of 100 characters" in message and "\n" not in message
    _write(path, [fits, fits])
    assert len(read_rows(path)) == 2  # exactly the limit is accepted


def test_the_limits_are_the_documented_ones():
    assert formats.MAX_FILE_BYTES == 1 << 30 and formats.MAX_FIELD_CHARS == 64 << 20
    doc = (ROOT / "docs" / "formats.md").read_text()
    assert "1 GiB" in doc and "64 Mi characters" in doc


# -- the too-long check on prefixes -------------------------------------------------------------


class CountingTokenizer:
    """A stand-in tokenizer, one token per word, that remembers how much text it was given."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def __call__(self, messages: list[dict[str, str]]) -> int:
        self.lengths.append(sum(len(m["content"]) for m in messages))
        return sum(len(m["content"].split()) for m in messages)


def test_a_huge_question_is_decided_on_a_prefix_never_tokenized_whole():
    huge = Question("word " * 2_000_000 + "?", "1", "exact", source="q.jsonl", line=3)
    count = CountingTokenizer()
    limit = 3 * FIRST_PREFIX_CHARS // 5  # prefixes of 16k and 32k characters are not too long
    (skipped,) = find_too_long([huge], PromptSet(), count, max_tokens=8, limit=limit)
    assert not skipped.exact
    assert len(count.lengths) == 3  # 16k, 32k, 64k characters: the third is over the limit
    assert max(count.lengths) < 5 * FIRST_PREFIX_CHARS < len(huge.text) // 100
    assert skipped.needed_tokens == skipped.prompt_tokens + 3 * 8 > limit
    assert skipped.prompt_tokens > 4 * FIRST_PREFIX_CHARS // 5  # the 64k prefix's words
    assert f"need at least {skipped.needed_tokens} tokens" in skipped.describe()


def test_a_question_that_fits_is_measured_whole_and_exactly():
    long_enough = Question("word " * (FIRST_PREFIX_CHARS // 2), "1", "exact")  # 2.5 prefixes
    short = Question("What is 6 * 7?", "42", "exact")
    count = CountingTokenizer()
    assert find_too_long([short], PromptSet(), count, max_tokens=8, limit=10**6) == []
    assert len(count.lengths) == 1  # a real question: one tokenization, as before
    count = CountingTokenizer()
    assert find_too_long([long_enough], PromptSet(), count, max_tokens=8, limit=10**6) == []
    assert max(count.lengths) > len(long_enough.text.strip())  # the last one held it whole
    # Too long by its whole text: the count is exact and the line says so without "at least".
    whole = count(PromptSet().messages("refiner", TreeContext(long_enough, "", "")))
    (skipped,) = find_too_long([long_enough], PromptSet(), count, max_tokens=8, limit=whole + 23)
    assert skipped.exact and skipped.prompt_tokens == whole
    assert "at least" not in skipped.describe()


def test_long_options_are_cut_with_the_question():
    """A CSQA option is prompt text too: a huge one is measured on a prefix as well."""
    q = Question("Pick one.", "A", "csqa", options=(("A", "word " * 1_000_000), ("B", "no")))
    count = CountingTokenizer()
    (skipped,) = find_too_long([q], PromptSet(), count, max_tokens=8, limit=2048)
    assert not skipped.exact and max(count.lengths) < 2 * FIRST_PREFIX_CHARS


def test_the_fit_is_measured_before_the_database_is_written(tmp_path, monkeypatch, small_model):
    """A failure while measuring (here: forced) leaves no run row, no question rows, no file."""

    def broken(*args, **kwargs):
        raise MaltError("measuring failed")

    monkeypatch.setattr(too_long, "find_too_long", broken)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    db = tmp_path / "malt.db"
    args = ["run", "--n", "1", "--max-tokens", "8", "--model", str(small_model), "--db", str(db)]
    r = CliRunner().invoke(cli, [*args, str(qfile)])
    assert r.exit_code == 2 and "measuring failed" in r.stderr, r.output
    assert not db.exists()


# -- the real command under a memory limit ------------------------------------------------------

MEMORY_LIMIT = 3 << 30  # 3 GiB of address space: the 200 MB question once took 19.9 GB


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _malt_limited(*args: str) -> tuple[int, str, str]:
    r = subprocess.run(
        [sys.executable, "-m", "malt_local", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=_limited,
        timeout=600,
    )
    return r.returncode, r.stdout, r.stderr


def test_malt_run_under_a_memory_limit(tmp_path, small_model):
    base = ["run", "--n", "1", "--max-tokens", "8", "--model", str(small_model)]

    # (a) One 200 MB question: refused by the field limit, one line, nothing written.
    huge = tmp_path / "huge.jsonl"
    with open(huge, "w") as f:
        f.write('{"question": "')
        for _ in range(200):
            f.write("word " * 200_000)  # 1 MB
        f.write('?", "answer": "#### 1"}\n')
    db = tmp_path / "a.db"
    code, _, err = _malt_limited(*base, "--db", str(db), str(huge))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{huge}:1: field 'question' holds 200000001 characters" in err
    assert not db.exists()
    huge.unlink()

    # (b) A questions file that is a link to /dev/zero: refused at the file limit.
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    db = tmp_path / "b.db"
    code, _, err = _malt_limited(*base, "--db", str(db), str(zero))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{zero} is larger than 1 GiB" in err
    assert not db.exists()

    # (c) A 16 MB question beside a short one: the long one is skipped as too long (decided on
    # a prefix), the short one's tree is built.
    long_text = "word " * 3_200_000 + "How many?"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"})
        + "\n"
        + json.dumps({"question": long_text, "answer": "#### 7"})
        + "\n"
    )
    db = tmp_path / "c.db"
    code, out, err = _malt_limited(*base, "--db", str(db), "--json", str(mixed))
    assert code == 0, err
    summary = json.loads(out)
    (skipped,) = summary["too_long"]
    long_id = question_id(long_text, "7")
    assert skipped["question_id"] == long_id and skipped["exact"] is False
    assert summary["nodes_generated"] == 3
    # A lower bound from a prefix: the whole question is 3.2 million words.
    assert skipped["limit_tokens"] < skipped["needed_tokens"] < 100_000
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT question_id, reason FROM skipped_questions").fetchall() == [
            (long_id, "too_long")
        ]
        built = {q for (q,) in conn.execute("SELECT DISTINCT question_id FROM nodes")}
    assert built == {question_id("What is 2 + 2?", "4")}
    status = malt("status", "--db", str(db), "--json")
    (run,) = json.loads(status.stdout)["runs"]
    assert [s["question_id"] for s in run["too_long"]] == [long_id]
    assert run["questions"] == 2 and run["nodes_expected"] == 3
