"""What a `malt pull` (or `malt run --model`) argument names: one file in one Hub repository.

Three spellings mean the same thing: a catalog alias (`ALIAS[:QUANT]`), a Hub path
(`OWNER/REPO/FILE.gguf`) and a Hub file URL (`https://huggingface.co/OWNER/REPO/resolve/REV/FILE`,
`blob/` too). `parse_spec` turns each into a `ModelSpec`, with the catalog's pinned sha256 when
the file is one of its aliases'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from malt_local.errors import MaltError
from malt_local.models.catalog import (
    DEFAULT_REVISION,
    ModelEntry,
    QuantFile,
    find_alias,
    load_catalog,
    suggest,
)
from malt_local.models.records import record_key


@dataclass(frozen=True)
class ModelSpec:
    """What a `malt pull` argument names: one file in one Hub repository."""

    repo: str
    file: str
    revision: str
    alias: str | None = None
    quant: str | None = None
    sha256: str | None = None  # pinned in the catalog
    size: int | None = None  # from the catalog, informational
    entry: ModelEntry | None = None

    def __post_init__(self) -> None:
        # Every spelling (alias, path, URL, a user's models.toml, --revision) ends here, and the
        # repository, the file and the revision become folder names in the HF cache: a name
        # that could climb out of it (`..`, an absolute path) is refused before any request.
        check_repo(self.repo)
        check_file_part(self.file)
        check_revision(self.revision)

    @property
    def key(self) -> str:
        return record_key(self.repo, self.file)

    @property
    def display(self) -> str:
        """How to name this model back to the user (what they would type)."""
        if self.alias:
            return f"{self.alias}:{self.quant}" if self.quant else self.alias
        return f"{self.repo}/{self.file}"


_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# What git's check-ref-format refuses anywhere in a ref name: control characters, space and
# ~ ^ : ? * [ \ (DEL included).
_REF_BAD_CHARS_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def _bad_path_part(value: str) -> str | None:
    """Why `value` cannot be a relative path inside a cache folder, or None when it can."""
    if not value:
        return "it is empty"
    if "\\" in value:
        return "it holds a backslash"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "it holds a control character"
    if value.startswith("/"):
        return "it is an absolute path"
    parts = value.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "it holds an empty, '.' or '..' component"
    return None


def check_file_part(file: str) -> None:
    """A Hub file name, which becomes ``snapshots/<commit>/<file>``: relative, no ``..``."""
    why = _bad_path_part(file)
    if why is not None:
        raise MaltError(f"file name {file!r} is refused: {why} (use OWNER/REPO/FILE.gguf)")


def check_repo(repo: str) -> None:
    """OWNER/REPO, which becomes the cache folder ``models--OWNER--REPO``."""
    why = _bad_path_part(repo) or (None if repo.count("/") == 1 else "it is not OWNER/REPO")
    if why is not None:
        raise MaltError(f"repository name {repo!r} is refused: {why}")


def check_revision(revision: str) -> None:
    """A 40-hex commit, or a name git's ref-name rules allow (it becomes ``refs/<revision>``)."""
    if _COMMIT_RE.match(revision):
        return
    why = None
    if not revision:
        why = "it is empty"
    elif _REF_BAD_CHARS_RE.search(revision):
        why = "it holds a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in revision or "//" in revision or "@{" in revision or revision == "@":
        why = "it holds '..', '//' or '@{'"
    elif revision.startswith(("/", "-")) or revision.endswith(("/", ".", ".lock")):
        why = "it starts with '/' or '-', or ends with '/', '.' or '.lock'"
    elif any(p.startswith(".") or p.endswith(".lock") for p in revision.split("/")):
        why = "a component starts with '.' or ends with '.lock'"
    if why is not None:
        raise MaltError(
            f"revision {revision!r} is refused: {why} (use a branch, a tag or a 40-hex commit)"
        )


_HUB_URL_RE = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/", re.IGNORECASE)


def looks_like_hub_path(spec: str) -> bool:
    """OWNER/REPO/FILE.gguf; an absolute path is a file on disk, never a Hub path."""
    return not spec.startswith("/") and spec.count("/") >= 2 and spec.lower().endswith(".gguf")


def parse_spec(
    spec: str,
    catalog: dict[str, ModelEntry] | None = None,
    revision: str | None = None,
) -> ModelSpec:
    """`ALIAS[:QUANT]`, `OWNER/REPO/FILE.gguf` or a Hub file URL, to a `ModelSpec`.

    A Hub path that matches a catalog entry picks up its pinned sha256, so pulling by path
    verifies as strictly as pulling by alias.
    """
    catalog = load_catalog() if catalog is None else catalog
    spec = spec.strip()
    if spec.startswith("/") and spec.lower().endswith(".gguf"):
        raise MaltError(
            f"'{spec}' is a path on disk, not a Hub file: use `malt pull ALIAS --file {spec}`"
        )
    if _HUB_URL_RE.match(spec) or looks_like_hub_path(spec):
        path = _HUB_URL_RE.sub("", spec)
        parts = path.split("/")
        url_revision = None
        if len(parts) >= 5 and parts[2] in ("resolve", "blob"):
            url_revision, parts = parts[3], parts[:2] + parts[4:]
        if len(parts) < 3 or not all(parts[:2]):
            raise MaltError(f"'{spec}' does not name a file: use OWNER/REPO/FILE.gguf")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        for entry in catalog.values():
            for qf in entry.files.values():
                if entry.repo == repo and qf.file == file:
                    return _from_entry(entry, qf, revision or url_revision or entry.revision)
        return ModelSpec(
            repo=repo, file=file, revision=revision or url_revision or DEFAULT_REVISION
        )
    if spec.count("/") == 1 and ":" not in spec.split("/")[0]:
        raise MaltError(
            f"'{spec}' names a repository, not a file: use {spec}/FILE.gguf, or an alias "
            "from `malt models`"
        )
    name, _, quant = spec.partition(":")
    entry = find_alias(name, catalog)
    if entry is None:
        raise MaltError(
            f"unknown model '{name}'{suggest(name, list(catalog))}; `malt models` lists them"
        )
    return _from_entry(entry, entry.quant_file(quant or None), revision or entry.revision)


def _from_entry(entry: ModelEntry, qf: QuantFile, revision: str) -> ModelSpec:
    """The spec of one quantisation of a catalog alias, with its pinned sha256 and size."""
    return ModelSpec(
        repo=entry.repo,
        file=qf.file,
        revision=revision,
        alias=entry.alias,
        quant=qf.quant,
        sha256=qf.sha256,
        size=qf.size,
        entry=entry,
    )
