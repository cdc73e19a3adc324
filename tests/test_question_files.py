"""Question files written by the tools people use, read back through `malt run`'s loader.

Every file here is written by the real library (pandas, the csv module, Hugging Face `datasets`,
pyarrow) or byte for byte as Excel, LibreOffice and Notepad write it, and must load with the
exact text that was written (less leading/trailing whitespace of a question or answer, which the
README documents).
"""

from __future__ import annotations

import codecs
import csv
import json

import pandas as pd
import pytest

from malt_local.errors import MaltError
from malt_local.questions.formats import read_rows
from malt_local.questions.loading import load_questions
from tests.conftest import malt

# Text that broke or changed on the way in before: a quoted comma and quote, line breaks of
# every kind inside a field, characters JSON allows raw in a string, non-BMP and combining ones.
TRICKY = [
    ('How much is 2+2, "roughly"?', "4"),
    ("First line\r\nsecond line\nthird\rfourth", "7"),
    ("Unicode line\u2028and paragraph\u2029and NEL\x85separators", "x"),
    ("Emoji 🧮, CJK 数学, RTL עברית, e\u0301 combining", "é"),
    ("Tabs\tinside and a trailing backslash \\", "1,000"),
]


def expect(rows=TRICKY):
    return [(q, a) for q, a in rows]


def loaded(path):
    return [(q.text, q.ground_truth) for q in load_questions(path, task="exact")]


def frame(rows=TRICKY):
    return pd.DataFrame({"question": [q for q, _ in rows], "answer": [a for _, a in rows]})


# -- CSV ----------------------------------------------------------------------------------------


def test_python_csv_module_default_dialect_keeps_line_breaks_inside_fields(tmp_path):
    p = tmp_path / "q.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)  # the excel dialect: CRLF between rows, quotes where needed
        w.writerow(["question", "answer"])
        w.writerows(TRICKY)
    assert b"second line\nthird\rfourth" in p.read_bytes()
    assert loaded(p) == expect()


def test_excel_csv_utf8_export_bom_and_crlf(tmp_path):
    # Excel's "CSV UTF-8": a UTF-8 BOM, CRLF row ends, LF for a line break inside a cell.
    body = 'question,answer\r\n"Line one\nline two, with ""quotes""",42\r\nSimple?,7\r\n'
    p = tmp_path / "excel.csv"
    p.write_bytes(codecs.BOM_UTF8 + body.encode("utf-8"))
    assert loaded(p) == [('Line one\nline two, with "quotes"', "42"), ("Simple?", "7")]


def test_excel_semicolon_csv_of_decimal_comma_locales(tmp_path):
    p = tmp_path / "de.csv"
    p.write_bytes(codecs.BOM_UTF8 + b"question;answer\r\nWie viel ist 1,5 + 1;2,5\r\n")
    assert loaded(p) == [("Wie viel ist 1,5 + 1", "2,5")]


@pytest.mark.parametrize("lineterminator", ["\n", "\r\n"])
@pytest.mark.parametrize("index", [False, True])
def test_pandas_to_csv(tmp_path, lineterminator, index):
    p = tmp_path / "q.csv"
    frame().to_csv(p, index=index, lineterminator=lineterminator)
    assert loaded(p) == expect()


def test_tsv_from_pandas(tmp_path):
    p = tmp_path / "q.tsv"
    frame().to_csv(p, sep="\t", index=False)
    assert loaded(p) == expect()


def test_csv_field_longer_than_the_csv_module_default_limit(tmp_path):
    big = "Count the words: " + "word " * 60_000  # 300 kB, over csv's 128 KiB default
    p = tmp_path / "long.csv"
    pd.DataFrame({"question": [big], "answer": ["60000"]}).to_csv(p, index=False)
    assert loaded(p) == [(big.strip(), "60000")]


# -- JSON and JSON Lines ------------------------------------------------------------------------


@pytest.mark.parametrize("force_ascii", [True, False])
def test_pandas_to_json_lines(tmp_path, force_ascii):
    p = tmp_path / "q.jsonl"
    frame().to_json(p, orient="records", lines=True, force_ascii=force_ascii)
    assert loaded(p) == expect()


@pytest.mark.parametrize("orient", ["records", "columns", "index", "split", "table"])
def test_pandas_to_json_every_orient_with_names(tmp_path, orient):
    p = tmp_path / "q.json"
    frame().to_json(p, orient=orient, force_ascii=False)
    assert loaded(p) == expect()


def test_raw_line_separators_inside_json_lines_strings(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw: valid JSON, and
    # str.splitlines() used to cut the record in two there.
    p = tmp_path / "q.jsonl"
    p.write_text(
        "".join(
            json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n" for q, a in TRICKY
        ),
        encoding="utf-8",
    )
    assert "\u2028" in p.read_text(encoding="utf-8")
    assert loaded(p) == expect()


def test_json_numbers_keep_their_literal_text(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "Price?", "answer": 4.10}\n{"question": "N?", "answer": 7}\n')
    assert loaded(p) == [("Price?", "4.10"), ("N?", "7")]


def test_lone_surrogate_is_one_clear_line(tmp_path):
    p = tmp_path / "q.jsonl"
    good = '{"question": "ok \\ud83e\\uddee", "answer": "1"}\n'
    p.write_text(good + '{"question": "bad \\ud800", "answer": "1"}\n')
    with pytest.raises(MaltError) as err:
        load_questions(p)
    assert err.value.message.endswith(
        "q.jsonl:2: field 'question' holds a lone surrogate (\\ud800), which is not a Unicode "
        "character: replace it or write its pair"
    )
    # Its pair written as two escapes is one character and loads.
    p.write_text('{"question": "ok \\ud83e\\uddee", "answer": "1"}\n')
    assert loaded(p) == [("ok 🧮", "1")]


# -- Hugging Face datasets and Parquet ----------------------------------------------------------


def test_hugging_face_datasets_to_json_csv_parquet(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"question": [q for q, _ in TRICKY], "answer": [a for _, a in TRICKY]})
    for name, write in [
        ("ds.json", ds.to_json),  # JSON Lines, whatever the suffix
        ("ds.jsonl", ds.to_json),
        ("ds.csv", ds.to_csv),
        ("ds.parquet", ds.to_parquet),
    ]:
        write(str(tmp_path / name))
        assert loaded(tmp_path / name) == expect(), name


def test_parquet_hub_shapes_gsm8k_and_commonsense_qa(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gsm = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.table({"question": ["Two plus two?"], "answer": ["2 + 2 = 4\n#### 4"]}), gsm)
    (q,) = load_questions(gsm)
    assert (q.task, q.text, q.ground_truth) == ("gsm8k", "Two plus two?", "4")
    # CommonsenseQA on the Hub: choices is a struct of lists, the answer an `answerKey` letter.
    csqa = tmp_path / "csqa.parquet"
    choices = {"label": ["A", "B", "C"], "text": ["bank", "library", "mall"]}
    pq.write_table(
        pa.table({"question": ["Where is money?"], "choices": [choices], "answerKey": ["A"]}), csqa
    )
    (c,) = load_questions(csqa)
    assert (c.task, c.ground_truth, c.options) == (
        "csqa",
        "A",
        (("A", "bank"), ("B", "library"), ("C", "mall")),
    )


def test_parquet_without_pyarrow_is_an_install_hint(tmp_path, monkeypatch):
    p = tmp_path / "q.parquet"
    frame().to_parquet(p)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(MaltError) as err:
        load_questions(p)
    assert err.value.message == (
        f"{p}: reading .parquet needs pyarrow: pip install 'malt-local[parquet]'"
    )


def test_not_a_parquet_file(tmp_path):
    p = tmp_path / "q.parquet"
    p.write_text("question,answer\n")
    with pytest.raises(MaltError, match="not a readable Parquet file") as err:
        load_questions(p)
    assert "\n" not in err.value.message


# -- encodings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
@pytest.mark.parametrize("name", ["q.csv", "q.txt", "q.jsonl"])
def test_byte_order_marked_files_load(tmp_path, codec, name):
    text = {
        "q.csv": 'question,answer\r\n"Grüße, 😀?",ß\r\n',
        "q.txt": "Grüße, 😀?\tß\r\n",
        "q.jsonl": json.dumps({"question": "Grüße, 😀?", "answer": "ß"}, ensure_ascii=False),
    }[name]
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}.get(codec, b"")
    p = tmp_path / name
    p.write_bytes(bom + text.encode(codec))  # utf-16/utf-32/utf-8-sig write their own mark
    assert loaded(p) == [("Grüße, 😀?", "ß")]


@pytest.mark.parametrize(
    "data,message",
    [
        (
            "question,answer\r\nCafé?,crème\r\n".encode("cp1252"),
            "is not UTF-8 (byte 0xe9 on line 2)",
        ),
        (
            "question,answer\r\nq,1\r\n".encode("utf-16-le"),
            "looks like UTF-16 without a BOM",
        ),
        (codecs.BOM_UTF16_LE + b"q\x00,", "starts with a UTF-16 LE byte-order mark but is not"),
    ],
)
def test_undecodable_files_are_one_line(tmp_path, data, message):
    p = tmp_path / "q.csv"
    p.write_bytes(data)
    with pytest.raises(MaltError) as err:
        load_questions(p)
    assert message in err.value.message
    assert err.value.message.endswith(
        "save it as UTF-8 (Excel: 'CSV UTF-8'; Notepad and LibreOffice: encoding UTF-8)"
    )
    assert err.value.exit_code == 2


def test_malt_run_refuses_a_bad_file_in_one_line_before_anything_is_written(tmp_path):
    p = tmp_path / "q.csv"
    p.write_bytes("question,answer\r\nCafé?,1\r\n".encode("cp1252"))
    db = tmp_path / "malt.db"
    r = malt("run", "--model", str(tmp_path / "none.gguf"), "--db", str(db), str(p))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "is not UTF-8" in r.stderr
    assert "Traceback" not in r.stderr
    assert not db.exists()


def test_whitespace_around_a_question_is_not_kept_inside_it_is(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "\r\n  two  spaces\n\ninside \n", "answer": " 4 "}))
    assert read_rows(p) == [(1, {"question": "\r\n  two  spaces\n\ninside \n", "answer": " 4 "})]
    assert loaded(p) == [("two  spaces\n\ninside", "4")]
