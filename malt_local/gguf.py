"""GGUF files: the magic bytes, and a reader for the header (metadata and tensor shapes).

A model, an adapter and a training base are all GGUF files, and each is checked here before
anything trusts it: llama.cpp would answer a wrong file with a NULL pointer and a C log, the
pull would register it. The reader is a few dozen lines on purpose: the `gguf` package is a test
extra, and checking a flag's file must not need it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from malt_local.errors import MaltError

GGUF_MAGIC = b"GGUF"

# GGUF value types: (struct format, size) for the fixed-size ones.
_SCALARS = {
    0: ("<B", 1),  # uint8
    1: ("<b", 1),  # int8
    2: ("<H", 2),  # uint16
    3: ("<h", 2),  # int16
    4: ("<I", 4),  # uint32
    5: ("<i", 4),  # int32
    6: ("<f", 4),  # float32
    7: ("<?", 1),  # bool
    10: ("<Q", 8),  # uint64
    11: ("<q", 8),  # int64
    12: ("<d", 8),  # float64
}
_STRING, _ARRAY = 8, 9
# More than this many tensors or keys is not a header, it is a corrupt (or hostile) file.
_MAX_COUNT = 1 << 24


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself: scalar metadata and tensor shapes (GGUF order).

    Array values are skipped (None): the tokenizer's arrays are large and no check needs them.
    """

    metadata: dict[str, object]
    tensors: dict[str, tuple[int, ...]]

    def string(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f = f
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise MaltError(f"{self.path} is a truncated GGUF file")
        return data

    def scalar(self, fmt: str, size: int):
        return struct.unpack(fmt, self.read(size))[0]

    def u32(self) -> int:
        return self.scalar("<I", 4)

    def u64(self) -> int:
        return self.scalar("<Q", 8)

    def string(self) -> str:
        n = self.u64()
        if n > 1 << 30:
            raise MaltError(f"{self.path} is not a valid GGUF file (string of {n} bytes)")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.u32(), self.u64()
            if itype in _SCALARS:
                self.f.seek(_SCALARS[itype][1] * n, 1)
            elif itype == _STRING:
                for _ in range(n):
                    self.f.seek(self.u64(), 1)
            else:
                for _ in range(n):
                    self.value(itype)
            return None
        raise MaltError(f"{self.path} is not a valid GGUF file (value type {vtype})")


def is_gguf(path: Path) -> bool:
    """Whether `path` is a readable file that starts with GGUF's magic bytes."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_gguf(path: Path, what: str = "file") -> None:
    """One clear line for a path that is missing, not a file or not GGUF, before anything
    (llama.cpp, the header reader, a registry record) trusts it; `what` names it ("model file")."""
    if not path.exists():
        raise MaltError(f"{what} not found: {path}")
    if not path.is_file():
        raise MaltError(f"not a file: {path}")
    if not is_gguf(path):
        raise MaltError(f"{path} is not a GGUF {what}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor shapes of a GGUF file, reading only its header."""
    check_gguf(path)
    try:
        with path.open("rb") as f:
            r = _Reader(f, path)
            f.read(4)  # the magic, checked above
            version = r.u32()
            if version < 2 or version > 0xFFFF:
                raise MaltError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.u64(), r.u64()
            if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
                raise MaltError(f"{path} is not a valid GGUF file")
            metadata: dict[str, object] = {}
            for _ in range(n_kv):
                key = r.string()
                metadata[key] = r.value(r.u32())
            tensors: dict[str, tuple[int, ...]] = {}
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.u32()
                if n_dims > 8:
                    raise MaltError(f"{path} is not a valid GGUF file (tensor {name})")
                dims = tuple(r.u64() for _ in range(n_dims))
                r.u32()  # ggml type
                r.u64()  # offset
                tensors[name] = dims
    except OSError as exc:
        raise MaltError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return GGUFHeader(metadata, tensors)
