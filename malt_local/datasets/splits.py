"""`hf:OWNER/NAME[/CONFIG]:SPLIT` question sources, resolved offline from the HF cache.

A source names a split of a pulled dataset; this module finds its files in
``datasets--OWNER--NAME/snapshots/<commit>/`` (the commit ``refs/<revision>`` names, `main`
unless ``OWNER/NAME@REVISION``) and nothing else: no network, so a run started on a plane reads
what `malt pull --dataset` fetched, and a source never pulled is one line saying to pull it.

Which files make a split is what the dataset card says, as `datasets.load_dataset` reads it:

    configs:
    - config_name: main
      data_files:
      - split: train
        path: main/train-*

Without a card's ``configs:`` the Hub's file-name conventions decide: a split keyword as the
file name (``test.jsonl``), its first part (``data/test-00000-of-00001.parquet``), its last
(``gsm8k_test.json``) or the folder (``test/0000.parquet``); when no file has one, all are
`train`.
A top-level folder that is no split keyword and not ``data`` is a config (``main/test-*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from malt_local.datasets.fields import FieldMap, defaults_for, map_row
from malt_local.datasets.hub import (
    CARD,
    LEGACY_IDS,
    REPO_TYPE,
    check_repo_id,
    is_data_file,
    pulled_commit,
)
from malt_local.errors import MaltError
from malt_local.models.hf_cache import hub_cache_dir, repo_folder
from malt_local.questions.formats import read_rows

PREFIX = "hf:"
DEFAULT_CONFIG = "default"
# The Hub's split keywords (datasets.data_files), each to the split name it stands for.
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}


def is_hf_source(value: object) -> bool:
    return str(value).startswith(PREFIX)


@dataclass(frozen=True)
class HfSource:
    """A parsed ``hf:OWNER/NAME[@REVISION][/CONFIG]:SPLIT``."""

    repo: str
    split: str
    config: str | None = None
    revision: str = "main"

    @classmethod
    def parse(cls, text: str) -> HfSource:
        body = text[len(PREFIX) :] if text.startswith(PREFIX) else text
        path, colon, split = body.rpartition(":")
        if not colon or not split or not path:
            raise MaltError(
                f"'{text}' is not a dataset source: expected hf:OWNER/NAME[/CONFIG]:SPLIT "
                "(hf:openai/gsm8k/main:test)"
            )
        parts = path.split("/")
        if len(parts) == 1 and parts[0].partition("@")[0] in LEGACY_IDS:
            name, config = parts[0], None  # "hf:gsm8k:test"; with a config, the full id
        elif len(parts) in (2, 3):
            name, config = "/".join(parts[:2]), parts[2] if len(parts) == 3 else None
        else:
            raise MaltError(
                f"'{text}' is not a dataset source: expected hf:OWNER/NAME[/CONFIG]:SPLIT "
                "(hf:openai/gsm8k/main:test)"
            )
        name, at, revision = name.partition("@")
        if at and not revision:
            raise MaltError(f"'{text}': nothing after '@' (expected OWNER/NAME@REVISION)")
        return cls(check_repo_id(name), split, config or None, revision or "main")

    @property
    def pull_hint(self) -> str:
        at = f"@{self.revision}" if self.revision != "main" else ""
        return f"malt pull --dataset {self.repo}{at}"

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision != "main" else ""
        config = f"/{self.config}" if self.config else ""
        return f"{PREFIX}{self.repo}{at}{config}:{self.split}"


@dataclass(frozen=True)
class Split:
    """The files of one split of a pulled dataset, in shard order."""

    source: HfSource
    commit: str
    snapshot: Path
    files: tuple[str, ...]  # repository paths below `snapshot`


# --------------------------------------------------------------------------- the card


def _card_configs(snapshot: Path) -> list[dict] | None:
    """The card's ``configs:`` list, or None when there is no card or it has none."""
    card = snapshot / CARD
    try:
        text = card.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.DOTALL)
    if not match:
        return None
    import yaml  # huggingface_hub's dependency; only a card needs it

    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise MaltError(
            f"{card}: cannot read the card's YAML ({' '.join(str(exc).split())})"
        ) from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A data_files pattern as fsspec reads it: ``*`` within a folder, ``**`` across them."""
    out = []
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.lstrip("/")):
        if token in ("**", "**/"):
            out.append("(?:.*/)?" if token == "**/" else ".*")
        elif token == "*":
            out.append("[^/]*")
        elif token == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out) + r"\Z")


def _patterns(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str)]
    return []


def _splits_from_card(configs: list[dict], files: list[str]) -> dict[str, dict[str, list[str]]]:
    """config -> split -> files, from the card's ``configs:``."""
    out: dict[str, dict[str, list[str]]] = {}
    for config in configs:
        name = str(config.get("config_name") or DEFAULT_CONFIG)
        data_files = config.get("data_files")
        entries: list[tuple[str, list[str]]] = []
        if isinstance(data_files, list) and all(isinstance(d, dict) for d in data_files):
            entries = [
                (str(d.get("split") or "train"), _patterns(d.get("path"))) for d in data_files
            ]
        elif isinstance(data_files, dict):  # {split: pattern(s)}
            entries = [(str(k), _patterns(v)) for k, v in data_files.items()]
        else:
            entries = [("train", _patterns(data_files))]
        splits = out.setdefault(name, {})
        for split, patterns in entries:
            regexes = [_glob_regex(p) for p in patterns]
            splits[split] = [f for f in files if any(r.match(f) for r in regexes)]
    return out


# --------------------------------------------------------------------------- conventions


def _split_of(path: str) -> str | None:
    parts = path.split("/")
    stem = parts[-1].split(".")[0].lower()
    candidates = [stem, re.split(r"[-_]", stem)[0], re.split(r"[-_]", stem)[-1]]
    if len(parts) > 1:
        candidates.append(parts[-2].lower())
    for word in candidates:
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def _splits_by_convention(files: list[str]) -> dict[str, dict[str, list[str]]]:
    """As `datasets` reads a repository without a card: the files with a split keyword make
    those splits; only when none has one are all of them `train`."""
    by_config: dict[str, list[str]] = {}
    for f in files:
        top = f.split("/")[0] if "/" in f else ""
        config = top if top and top.lower() not in _SPLIT_WORDS and top != "data" else ""
        by_config.setdefault(config or DEFAULT_CONFIG, []).append(f)
    out: dict[str, dict[str, list[str]]] = {}
    for config, names in by_config.items():
        named = [(f, _split_of(f)) for f in names]
        if not any(split for _, split in named):
            named = [(f, "train") for f in names]
        for f, split in named:
            if split:
                out.setdefault(config, {}).setdefault(split, []).append(f)
    return out


# --------------------------------------------------------------------------- resolving


def _snapshot_files(snapshot: Path) -> list[str]:
    return sorted(
        p.relative_to(snapshot).as_posix()
        for p in snapshot.rglob("*")
        if p.is_file() and is_data_file(p.relative_to(snapshot).as_posix())
    )


def splits_of(snapshot: Path) -> dict[str, dict[str, list[str]]]:
    """Every config of a pulled snapshot, each with its splits' files (shard order)."""
    files = _snapshot_files(snapshot)
    configs = _card_configs(snapshot)
    found = _splits_from_card(configs, files) if configs else _splits_by_convention(files)
    return {c: {s: sorted(fs) for s, fs in splits.items()} for c, splits in found.items()}


def example_sources(repo: str, splits: dict[str, dict[str, list[str]]]) -> list[str]:
    """The `hf:` source of every split, for `malt pull --dataset` to print."""
    out = []
    for config, by_split in splits.items():
        named = f"/{config}" if len(splits) > 1 or config != DEFAULT_CONFIG else ""
        out.extend(f"{PREFIX}{repo}{named}:{split}" for split in by_split)
    return out


def resolve(source: HfSource, cache_dir: Path | None = None) -> Split:
    """The files of `source`'s split in the cache; one line for each way it is not there."""
    cache_dir = cache_dir or hub_cache_dir()
    commit = pulled_commit(cache_dir, source.repo, source.revision)
    if commit is None:
        raise MaltError(f"dataset {source.repo} is not pulled; run `{source.pull_hint}`")
    snapshot = repo_folder(cache_dir, source.repo, REPO_TYPE) / "snapshots" / commit
    splits = splits_of(snapshot)
    config = source.config
    if config is None:
        if len(splits) == 1:
            config = next(iter(splits))
        elif DEFAULT_CONFIG in splits:
            config = DEFAULT_CONFIG
        else:
            raise MaltError(
                f"{source.repo} has several configs ({', '.join(splits)}): name one, as "
                f"{PREFIX}{source.repo}/{next(iter(splits))}:{source.split}"
            )
    if config not in splits:
        raise MaltError(
            f"{source.repo} has no config '{config}': it has {', '.join(splits) or 'none'}"
        )
    files = splits[config].get(source.split)
    if files is None:
        raise MaltError(
            f"{source.repo} config '{config}' has no split '{source.split}': it has "
            f"{', '.join(splits[config]) or 'none'}"
        )
    if not files:
        raise MaltError(
            f"{source.repo} config '{config}' split '{source.split}': none of its files were "
            f"pulled; run `{source.pull_hint}` again"
        )
    return Split(source, commit, snapshot, tuple(files))


def split_rows(split: Split, fields: FieldMap | None = None) -> Iterator[tuple[str, int, dict]]:
    """(question source, row number, mapped row) for every row of the split's files.

    A question's source is the `hf:` string and the file (``hf:openai/gsm8k/main:test:
    main/test-00000-of-00001.parquet``): the identity a too-long report or `malt show` prints.
    The mapping is `fields` over the dataset's known defaults (`fields.KNOWN`).
    """
    mapping = (fields or FieldMap()).over(defaults_for(split.source.repo))
    for file in split.files:
        name = f"{split.source}:{file}"
        for line, row in read_rows(split.snapshot / file):
            yield name, line, map_row(row, mapping, f"{name}:{line}")
