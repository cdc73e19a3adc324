"""The files of an export, written so that they appear whole or not at all.

Every file is written line by line (`Writer`; `JsonDataset` streams the seed's one-object JSON
file through a body file), so memory does not grow with the data. `file_names` is the one list
of what an export of a role writes, by purpose. Files are written into a temporary folder
(`temp_folder`) and renamed into place by `publish` only when all of them are complete, so a
failed export leaves nothing half-written; files an earlier export listed in its manifest and
this one did not are removed.

Nothing is written or removed through a link: a folder inside `out` that is a symbolic link
(or a file) where the export needs a folder is refused before anything moves, and an old
manifest's file under such a link is left alone, since removing it would delete the file the
link points to, outside `out`. A folder malt cannot write (read-only, or under a regular file)
is one line before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from malt_local.diskspace import disk_full_error, is_disk_full
from malt_local.errors import MaltError
from malt_local.export.manifest import MANIFEST


class Writer:
    """A file written line by line, counting lines and hashing what it writes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[str] = path.open("w", encoding="utf-8", newline="\n")
        self.lines = 0

    def write_line(self, obj: Any) -> None:
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.lines += 1

    def write_raw(self, text: str) -> None:
        self._fh.write(text)

    def close(self) -> None:
        self._fh.close()


def _indented(obj: Any, prefix: str) -> str:
    text = json.dumps(obj, ensure_ascii=False, indent=2)
    return "\n".join(prefix + line for line in text.splitlines())


class JsonDataset:
    """`ROLE_training.json`, streamed: examples go to a body file, then the whole file is
    assembled with `total_examples` known. The bytes equal `json.dumps(whole, indent=2)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.body = Writer(path.with_name(path.name + ".body"))

    def add(self, example: dict) -> None:
        self.body.write_raw(("," if self.body.lines else "") + "\n" + _indented(example, "    "))
        self.body.lines += 1

    def finish(self, metadata: dict) -> int:
        self.body.close()
        count = self.body.lines
        metadata = {**metadata, "total_examples": count}
        with self.path.open("w", encoding="utf-8", newline="\n") as out:
            out.write('{\n  "metadata": ' + _indented(metadata, "  ").lstrip() + ",\n")
            if count == 0:
                out.write('  "examples": []\n}\n')
            else:
                out.write('  "examples": [')
                with self.body.path.open(encoding="utf-8") as body:
                    shutil.copyfileobj(body, out)
                out.write("\n  ]\n}\n")
        self.body.path.unlink()
        return count


@dataclass
class RoleFiles:
    """The writers of one role's files (None: that format was not asked for)."""

    sft: Writer | None = None
    sft_prov: Writer | None = None
    dpo: Writer | None = None
    dpo_prov: Writer | None = None
    seed_json: JsonDataset | None = None
    split: dict[str, tuple[Writer, Writer]] = field(default_factory=dict)

    def writers(self) -> list[Writer]:
        out = [w for w in (self.sft, self.sft_prov, self.dpo, self.dpo_prov) if w is not None]
        for pair in self.split.values():
            out.extend(pair)
        return out


def file_names(role: str, formats: tuple[str, ...], split: bool) -> dict[str, str]:
    """Every file an export of `role` writes, by purpose, relative to the output folder."""
    names: dict[str, str] = {}
    if "sft" in formats:
        names["sft"] = f"{role}.sft.jsonl"
        names["sft_prov"] = f"provenance/{role}.sft.jsonl"
        if split:
            for part in ("train", "valid"):
                names[part] = f"{role}/{part}.jsonl"
                names[part + "_prov"] = f"provenance/{role}.{part}.jsonl"
    if "dpo" in formats:
        names["dpo"] = f"{role}.dpo.jsonl"
        names["dpo_prov"] = f"provenance/{role}.dpo.jsonl"
    if "json" in formats:
        names["json"] = f"{role}_training.json"
    return names


def temp_folder(out: Path) -> Path:
    """A new folder beside (or inside) `out` on the same file system, so `publish` renames.

    This is the export's first write: a folder that cannot be written (read-only, or a path
    under a regular file) is a MaltError here, with nothing written."""
    for above in out.parents:
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise MaltError(f"output folder {out} is under {above}, which is not a folder")
            break
    try:
        if out.is_dir():
            return Path(tempfile.mkdtemp(prefix=".malt-export.", dir=out))
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.malt-export.", dir=out.parent))
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, out) from None
        where = out if out.is_dir() else out.parent
        raise MaltError(
            f"cannot write the export into {out}: {exc.strerror or exc} ({where})"
        ) from exc


def _real_folders(out: Path, name: str) -> bool:
    """Whether every folder between `out` and `out/name` is a real folder or not there yet:
    never a symbolic link (or a file), which would take a write or a removal outside `out`."""
    folder = out
    for part in Path(name).parts[:-1]:
        folder = folder / part
        try:
            mode = folder.lstat().st_mode
        except FileNotFoundError:
            return True  # created by the export, inside `out`
        if not stat.S_ISDIR(mode):
            return False
    return True


def _check_targets(out: Path, names: list[str]) -> None:
    """Refuse, before anything moves, a target under a link or a file, or one that is a
    folder: a rename that failed halfway would leave `out` half old, half new."""
    for name in names:
        if not _real_folders(out, name):
            raise MaltError(
                f"output folder {out}: {name} would be written through a symbolic link or "
                "under a file; remove it, or export into a new folder"
            )
        dest = out / name
        if dest.is_dir() and not dest.is_symlink():
            raise MaltError(f"output folder {out}: {name} is a folder; remove it")


def publish(tmp: Path, out: Path, manifest: dict) -> None:
    """Move the finished files into `out`: one rename when `out` is new, else file by file
    with the manifest last; files a previous export listed and this one did not are removed."""
    (tmp / MANIFEST).write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    if not out.exists():
        os.rename(tmp, out)
        return
    _check_targets(out, [*manifest["files"], MANIFEST])
    old = _old_files(out)
    for name in manifest["files"]:
        dest = out / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, dest)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    for name in sorted(old - set(manifest["files"])):
        # Checked again just before the removal: a link is never followed.
        if not _real_folders(out, name):
            continue
        with contextlib.suppress(OSError):
            (out / name).unlink()
            parent = (out / name).parent
            while parent != out and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    shutil.rmtree(tmp, ignore_errors=True)


def _old_files(out: Path) -> set[str]:
    """The files the manifest already in `out` lists (safe relative names only, none under a
    symbolic link or a file inside `out`)."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        names = data.get("files", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return set()
    safe = set()
    for name in names if isinstance(names, dict) else ():
        if not isinstance(name, str):
            continue
        p = Path(name)
        if p.parts and not p.is_absolute() and ".." not in p.parts and _real_folders(out, name):
            safe.add(name)
    return safe
