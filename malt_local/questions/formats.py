"""Question files as real tools write them: the bytes on disk to rows of named fields.

`malt_local.questions.loading` decides what a row means; this module only gets the rows out of
a file with the text each tool wrote. What "the text the tool wrote" means here:

- The encoding is read, not guessed. A byte-order mark says UTF-8 (Excel's "CSV UTF-8", old
  Notepad), UTF-16 LE/BE (Notepad's "Unicode", PowerShell 5's `Out-File`) or UTF-32; without
  one the file must be UTF-8. Anything else (Excel's plain "CSV" in a Windows code page) is
  refused with one line that says how to save it as UTF-8, never decoded by a guess that could
  change characters.
- Line ends between records (LF, CRLF, CR) are not text. Inside a quoted CSV field every
  character is kept as written, a CRLF included: Excel writes a line break inside a cell as LF,
  Python's csv module and pandas keep whatever the string held.
- In JSON and JSON Lines a string's escapes are decoded (`\\n`, `\\u00e9`, surrogate pairs), and
  JSON Lines records are split on LF only, so U+2028, U+2029 and U+0085, which JSON allows raw
  inside a string, stay inside their string. A lone surrogate (`"\\ud800"` with no partner) is
  not a character: no UTF-8 file, SQLite text or tokenizer can hold it, so such a row is refused
  with one line naming it. Numbers keep their literal text (`4.10` stays "4.10").
- CSV fields have no length limit (the csv module's default of 128 KiB refuses long questions).
  The delimiter is read from the header: `,`, `;` (Excel in locales with a decimal comma) or
  TAB; `.tsv` is always TAB.
- `.parquet` (the Hugging Face Hub's format) is read with pyarrow, an optional dependency.
- Memory is bounded: a file is read in chunks and refused past `MAX_FILE_BYTES` (so a link to
  `/dev/zero` or an endless pipe is one line, never a MemoryError), and a field longer than
  `MAX_FIELD_CHARS` is refused with its row before anything is written (no context holds it,
  and tokenizing or storing it would take gigabytes).

pandas' `to_json` writes one of several layouts (`orient`): records (a list), columns and index
(an object of objects), split and table (an object holding `data`); all of them are read.
`datasets`' `to_json` writes JSON Lines even into a `.json` file, so a `.json` file holding
several documents is read as JSON Lines.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from malt_local.errors import MaltError

FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
Row = tuple[int, dict]

# A questions file larger than this is refused before it is read whole: the biggest benchmark
# files are tens of megabytes, and decoding and parsing take a few times the file's size.
MAX_FILE_BYTES = 1 << 30  # 1 GiB
# One field (a question, an answer, an option) longer than this is refused with its row: no
# model's context comes near it, and it would only cost memory on its way to the too-long check.
MAX_FIELD_CHARS = 64 << 20  # 64 Mi characters
_CHUNK_BYTES = 16 << 20  # what one read asks for: memory stays near the bytes accepted so far

# Longest first: a UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)
_LINE_END = re.compile(r"\r\n|\r|\n")
_SAVE_AS_UTF8 = "save it as UTF-8 (Excel: 'CSV UTF-8'; Notepad and LibreOffice: encoding UTF-8)"


def read_rows(path: Path) -> list[Row]:
    """Every row of a questions file as (line or row number, fields), text as written."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise MaltError(
            f"unsupported questions file type '{suffix}': use {', '.join(FORMATS[:-1])} "
            f"or {FORMATS[-1]}"
        )
    data = read_bounded(path)
    if suffix == ".parquet":
        found = _rows_parquet(data, path)
    else:
        raw = decode(data, path)
        del data  # the text replaces the bytes: at most one copy of a large file at a time
        reader = {
            ".jsonl": _rows_jsonl,
            ".json": _rows_json,
            ".csv": _rows_csv,
            ".tsv": _rows_csv,
            ".txt": _rows_txt,
        }[suffix]
        found = reader(raw, path)
    rows = []
    for n, row in found:
        _check_field_sizes(row, path, n)
        _check_characters(row, path, n)
        rows.append((n, row))
    return rows


def read_bounded(path: Path, limit: int | None = None) -> bytes:
    """The file's bytes, read in chunks and refused once they pass `limit` (`MAX_FILE_BYTES`).

    The size on disk is not trusted to say when to stop: `/dev/zero`, a link to it, a FIFO or a
    file still growing report 0 or less than they hold. At most `limit` + one chunk is held
    before the refusal, so an endless source is one line, never a MemoryError.
    """
    limit = MAX_FILE_BYTES if limit is None else limit
    too_big = MaltError(
        f"questions file {path} is larger than {_size(limit)}, the limit for one questions "
        "file: split it into smaller files (or check that it is the file you meant)"
    )
    chunks: list[bytes] = []
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > limit:
                raise too_big
            total = 0
            while chunk := f.read(min(_CHUNK_BYTES, limit + 1 - total)):
                total += len(chunk)
                if total > limit:
                    chunks.clear()
                    raise too_big
                chunks.append(chunk)
    except OSError as exc:
        raise MaltError(f"cannot read questions file {path}: {exc.strerror or exc}") from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _size(n: int, unit: str = "bytes") -> str:
    """A limit as people write it: "1 GiB", "64 Mi characters", else "1000 bytes"."""
    for shift, prefix in ((30, "Gi"), (20, "Mi"), (10, "Ki")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {prefix}B" if unit == "bytes" else f"{n >> shift} {prefix} {unit}"
    return f"{n} {unit}"


def decode(data: bytes, path: Path) -> str:
    """The file's text: by its byte-order mark, else UTF-8; anything else is one clear line."""
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(codec)
            except UnicodeDecodeError as exc:
                raise MaltError(
                    f"{path}: starts with a {name} byte-order mark but is not {name} "
                    f"(bad bytes at offset {exc.start + len(bom)}): {_SAVE_AS_UTF8}"
                ) from exc
    head = data[:200]
    if head and head.count(b"\x00") * 3 > len(head):
        # ASCII in UTF-16 is valid UTF-8 full of NULs: it would load as garbage rows.
        what = "looks like UTF-16 without a BOM (byte-order mark)"
        raise MaltError(f"{path}: {what}: {_SAVE_AS_UTF8}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MaltError(
            f"{path}: is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}): {_SAVE_AS_UTF8}"
        ) from exc


def _json_loads(text: str):
    # Floats keep their literal text: a ground truth "4.10" must not become "4.1".
    return json.loads(text, parse_float=str)


def _rows_jsonl(raw: str, p: Path) -> Iterator[Row]:
    # LF only (CR is JSON whitespace): U+2028 and friends are allowed raw inside JSON strings.
    for n, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = _json_loads(line)
        except json.JSONDecodeError as exc:
            raise MaltError(f"{p}:{n}: malformed JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise MaltError(f"{p}:{n}: expected a JSON object per line")
        yield n, row


def _rows_json(raw: str, p: Path) -> Iterator[Row]:
    if not raw.strip():
        return
    try:
        data = _json_loads(raw)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # `datasets`' to_json and pandas' lines=True write JSON Lines whatever the suffix.
            yield from _rows_jsonl(raw, p)
            return
        raise MaltError(f"{p}:{exc.lineno}: malformed JSON: {exc.msg}") from exc
    if isinstance(data, dict):
        data = _unwrap(data, p)
    if not isinstance(data, list):
        raise MaltError(f"{p}: expected a JSON list of objects")
    for n, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise MaltError(f"{p}: item {n} is not an object")
        yield n, row


def _unwrap(data: dict, p: Path) -> list | dict:
    """The list of rows inside the object shapes people and pandas wrap them in."""
    # {"questions": [...]}, {"examples": [...]}; pandas orient="table" is {"schema", "data"}.
    for key in ("questions", "examples", "data", "rows"):
        if isinstance(data.get(key), list):
            if key == "data" and isinstance(data.get("columns"), list):
                break  # pandas orient="split": rows are lists of values
            return data[key]
    if isinstance(data.get("columns"), list) and isinstance(data.get("data"), list):
        columns = data["columns"]
        rows = []
        for n, values in enumerate(data["data"], 1):
            if not isinstance(values, list) or len(values) != len(columns):
                raise MaltError(f"{p}: row {n} of 'data' does not match 'columns'")
            rows.append(dict(zip(map(str, columns), values, strict=True)))
        return rows
    values = list(data.values())
    if values and all(isinstance(v, dict) for v in values):
        inner = [set(v) for v in values]
        if any(k in data for k in ("question", "problem", "prompt")):
            # pandas orient="columns": {"question": {"0": ...}, "answer": {"0": ...}}
            index = list(dict.fromkeys(k for v in values for k in v))
            return [{col: data[col].get(i) for col in data} for i in index]
        if all(s & {"question", "problem", "prompt"} for s in inner):
            return values  # pandas orient="index": {"0": {"question": ...}, ...}
    return [data]


def _delimiter(raw: str, p: Path) -> str:
    if p.suffix.lower() == ".tsv":
        return "\t"
    header = _LINE_END.split(raw, maxsplit=1)[0]
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _rows_csv(raw: str, p: Path) -> Iterator[Row]:
    if not raw.strip():
        return
    _allow_long_fields()
    reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter=_delimiter(raw, p))
    try:
        if not reader.fieldnames or not any(f.strip() for f in reader.fieldnames):
            raise MaltError(f"{p}:1: CSV has no header row")
        for row in reader:
            n = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise MaltError(f"{p}:{n}: malformed CSV: wrong number of fields")
            if not any(v.strip() for v in row.values()):
                continue
            # A header cell may be padded ("question, answer"); an empty one is pandas' index.
            yield n, {k.strip(): v for k, v in row.items() if k.strip()}
    except csv.Error as exc:
        raise MaltError(f"{p}:{reader.line_num}: malformed CSV: {exc}") from exc


def _allow_long_fields() -> None:
    # The limit is process-wide in the csv module; raising it only ever accepts more.
    limit = min(sys.maxsize, 2**31 - 1)
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _rows_txt(raw: str, p: Path) -> Iterator[Row]:
    for n, line in enumerate(_LINE_END.split(raw), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise MaltError(f"{p}:{n}: expected 'question<TAB>ground truth'")
        question, _, answer = line.rpartition("\t")
        yield n, {"question": question, "answer": answer}


def _rows_parquet(data: bytes, p: Path) -> Iterator[Row]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MaltError(
            f"{p}: reading .parquet needs pyarrow: pip install 'malt-local[parquet]'"
        ) from exc
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise MaltError(f"{p}: not a readable Parquet file: {_one_line(str(exc))}") from exc
    for n, row in enumerate(table.to_pylist(), 1):
        yield n, {k: _parquet_value(v) for k, v in row.items()}


def _parquet_value(value: object) -> object:
    # A binary column holding text (some exports) reads as the text, not as "b'...'".
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_field_sizes(row: dict, p: Path, n: int) -> None:
    """A field past `MAX_FIELD_CHARS` is named with its row, before anything is written."""
    for key, value in row.items():
        for text in _strings(value):
            if len(text) > MAX_FIELD_CHARS:
                raise MaltError(
                    f"{p}:{n}: field '{key}' holds {len(text)} characters, over the limit of "
                    f"{_size(MAX_FIELD_CHARS, 'characters')} for one field: shorten it (no "
                    "model's context holds it)"
                )


def _check_characters(row: dict, p: Path, n: int) -> None:
    """A lone surrogate cannot be stored or tokenized: name the row instead of failing later."""
    for key, value in row.items():
        for text in _strings(value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = f"\\u{ord(text[exc.start]):04x}"
                raise MaltError(
                    f"{p}:{n}: field '{key}' holds a lone surrogate ({bad}), which is not a "
                    "Unicode character: replace it or write its pair"
                ) from exc


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
