"""Test helper: a copy of a GGUF file with one string of its metadata replaced (or added).

A hostile chat template is planted in the small model this way (`tokenizer.chat_template`).
The header is re-parsed here, not through the `gguf` package: only the key-value section
changes, tensor infos are copied as they are, and the tensor data keeps its alignment (tensor
offsets count from the aligned start of the data, so only the padding before it changes).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import BinaryIO

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", f.read(4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", f.read(8))[0]


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _SIZES:
        f.seek(_SIZES[vtype], 1)
    elif vtype == _STRING:
        f.seek(_u64(f), 1)
    elif vtype == _ARRAY:
        itype, n = _u32(f), _u64(f)
        for _ in range(n):
            _skip_value(f, itype)
    else:
        raise ValueError(f"GGUF value type {vtype}")


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def with_metadata_string(src: Path, dst: Path, key: str, value: str) -> Path:
    """Write `src` to `dst` with metadata `key` set to the string `value`; returns `dst`."""
    with src.open("rb") as f:
        magic, version = f.read(4), _u32(f)
        n_tensors, n_kv = _u64(f), _u64(f)
        kvs: list[bytes] = []
        alignment = 32
        for _ in range(n_kv):
            start = f.tell()
            name = f.read(_u64(f)).decode("utf-8")
            vtype = _u32(f)
            if name == "general.alignment":
                alignment = struct.unpack("<I", f.read(4))[0]
            else:
                _skip_value(f, vtype)
            end = f.tell()
            if name != key:
                f.seek(start)
                kvs.append(f.read(end - start))
                f.seek(end)
        kvs.append(_string(key) + struct.pack("<I", _STRING) + _string(value))
        infos_start = f.tell()
        for _ in range(n_tensors):
            f.seek(_u64(f), 1)
            f.seek(8 * _u32(f) + 4 + 8, 1)
        infos_end = f.tell()
        f.seek(infos_start)
        infos = f.read(infos_end - infos_start)
        data_start = -(-infos_end // alignment) * alignment
        head = magic + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + infos
        with dst.open("wb") as out:
            out.write(head + b"\0" * (-len(head) % alignment))
            f.seek(data_start)
            shutil.copyfileobj(f, out, 1 << 20)
    return dst
