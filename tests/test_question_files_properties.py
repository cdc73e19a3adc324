"""Property tests: any table of strings written by pandas or the csv module reads back exactly.

The hypothesis profile (tests/conftest.py) bounds the time; HYPOTHESIS_PROFILE=fuzz searches
longer. A bare CR inside a cell round-trips only where the writer quotes it: with LF row
ends the csv module and pandas write it unquoted, and no reader (theirs included) can tell it
from a CRLF row end, so those tables are left out. NUL is left out of the alphabet only
because Python 3.10's csv reader refuses it (3.11+ reads it, and so does malt there).
"""

from __future__ import annotations

import csv

import pandas as pd
from hypothesis import assume, given
from hypothesis import strategies as st

from malt_local.questions.formats import read_rows
from malt_local.questions.loading import load_questions

# Every character JSON and CSV can carry, weighted towards the ones that broke loaders: quotes,
# delimiters, every kind of line end, BOMs and Unicode separators.
TRICKY = '",;\t\r\n \u2028\u2029\x85\x0b\x0c\x1c\ufeff\\#'
CELL = st.text(
    st.one_of(
        st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
        st.sampled_from(TRICKY),
    ),
    max_size=20,
)
HEADER = ["question", "answer", "note"]
TABLE = st.lists(st.tuples(CELL, CELL, CELL), min_size=1, max_size=6)


def kept(table):
    """The rows a reader returns: rows whose cells are all blank are skipped, as documented."""
    return [dict(zip(HEADER, row, strict=True)) for row in table if any(c.strip() for c in row)]


def values(rows):
    return [row for _, row in rows]


@given(table=TABLE, lineterminator=st.sampled_from(["\r\n", "\n"]), bom=st.booleans())
def test_csv_module_tables_round_trip(tmp_path_factory, table, lineterminator, bom):
    assume(lineterminator == "\r\n" or not any("\r" in c for row in table for c in row))
    p = tmp_path_factory.mktemp("csv") / "q.csv"
    with p.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f, lineterminator=lineterminator)
        w.writerow(HEADER)
        w.writerows(table)
    assert values(read_rows(p)) == kept(table)


@given(table=TABLE, sep=st.sampled_from([",", ";", "\t"]))
def test_pandas_to_csv_tables_round_trip(tmp_path_factory, table, sep):
    p = tmp_path_factory.mktemp("pd") / "q.csv"
    pd.DataFrame(table, columns=HEADER).to_csv(p, index=False, sep=sep, lineterminator="\r\n")
    assert values(read_rows(p)) == kept(table)


@given(table=TABLE, force_ascii=st.booleans())
def test_pandas_to_json_lines_round_trip(tmp_path_factory, table, force_ascii):
    p = tmp_path_factory.mktemp("pdj") / "q.jsonl"
    pd.DataFrame(table, columns=HEADER).to_json(
        p, orient="records", lines=True, force_ascii=force_ascii
    )
    assert values(read_rows(p)) == [dict(zip(HEADER, r, strict=True)) for r in table]


@given(table=TABLE)
def test_questions_are_the_cells_less_outer_whitespace(tmp_path_factory, table):
    assume(all(q.strip() and a.strip() and "####" not in a for q, a, _ in table))
    p = tmp_path_factory.mktemp("q") / "q.csv"
    pd.DataFrame(table, columns=HEADER).to_csv(p, index=False, lineterminator="\r\n")
    got = [(q.text, q.ground_truth) for q in load_questions(p, task="exact")]
    assert got == list(dict.fromkeys((q.strip(), a.strip()) for q, a, _ in table))
