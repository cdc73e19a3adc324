"""`malt pull --dataset OWNER/NAME[@REVISION]`: a Hub dataset's data files into the HF cache.

The files go where huggingface_hub puts them (``datasets--OWNER--NAME/{blobs,snapshots,refs}``
under HF_HUB_CACHE), so `datasets.load_dataset` and `hf download --repo-type dataset` reuse them
and malt reads theirs. Each file is fetched by the model pull's machinery
(`malt_local.models.download.fetch_blob`): resumable after a cut or a kill, its sha256 checked
against the Hub's ETag (LFS files: Parquet, large JSON) or its git sha1 (files kept in git: the
dataset card, small JSON), a mismatch deleted.

Why the ref is written last: `hf:` sources are resolved offline through ``refs/<revision>``, so a
pull that stopped half-way must not look like a pulled dataset (a pinned commit has no ref: a
marker with the lock files, removed at the end, says the same). The files a finished pull left
are kept and verified again by the next one, which fetches only what is missing.

Only what malt can read is fetched: the data files (`DATA_SUFFIXES`) and ``README.md`` (its
``configs:`` say which files make which split). The revision asked is pinned to the commit the
Hub answered before the first file, so every file comes from one commit.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.models.download import Fetched, NullProgress, Progress, fetch_blob
from malt_local.models.hf_cache import (
    HubConfig,
    cache_dirs,
    refuse_symlink,
    repo_folder,
    write_ref,
)
from malt_local.models.hub_http import Target, Transient, Unreachable, get_json, head_file

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
CARD = "README.md"
REPO_TYPE = "dataset"
# Hub ids: OWNER/NAME of letters, digits, '-', '_', '.'; the legacy one-word ids of the
# benchmarks' datasets ("gsm8k") are what the Hub redirects, so they are named in full here.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
LEGACY_IDS = {
    "gsm8k": "openai/gsm8k",
    "commonsense_qa": "tau/commonsense_qa",
    "openai_humaneval": "openai/openai_humaneval",
    "mbpp": "google-research-datasets/mbpp",
}


def check_repo_id(value: str) -> str:
    """`value` as a dataset id (a legacy one-word id as its OWNER/NAME), or a one-line error."""
    repo = LEGACY_IDS.get(value, value)
    if not _ID_RE.match(repo) or ".." in repo or repo.endswith(".git"):
        raise MaltError(f"'{value}' is not a Hub dataset id: expected OWNER/NAME (openai/gsm8k)")
    return repo


@dataclass(frozen=True)
class DatasetRef:
    """What `--dataset` names: a repository and the revision asked (a branch, tag or commit)."""

    repo: str
    revision: str = "main"

    @classmethod
    def parse(cls, text: str) -> DatasetRef:
        name, at, revision = text.strip().partition("@")
        if at and not revision:
            raise MaltError(f"'{text}': nothing after '@' (expected OWNER/NAME@REVISION)")
        return cls(check_repo_id(name), revision or "main")

    @property
    def display(self) -> str:
        """What the user retypes: `malt pull --dataset X`."""
        at = f"@{self.revision}" if self.revision != "main" else ""
        return f"--dataset {self.repo}{at}"


@dataclass(frozen=True)
class DatasetPull:
    """What one `malt pull --dataset` did: the commit and each file."""

    ref: DatasetRef
    commit: str
    snapshot: Path  # snapshots/<commit>/, the folder `hf:` sources read
    files: dict[str, Fetched] = field(default_factory=dict)  # repository path -> what happened
    offline: bool = False  # HF_HUB_OFFLINE: only the cache was looked at

    @property
    def transferred(self) -> int:
        return sum(f.transferred for f in self.files.values())

    def as_dict(self) -> dict:
        return {
            "repo": self.ref.repo,
            "revision": self.ref.revision,
            "commit": self.commit,
            "snapshot": str(self.snapshot),
            "bytes_transferred": self.transferred,
            "files": [
                {
                    "file": name,
                    "path": str(f.snapshot),
                    "sha256": f.sha256,
                    "size": f.snapshot.stat().st_size,
                    "action": f.action,
                    "bytes_transferred": f.transferred,
                    "resumed_from": f.resumed_from,
                }
                for name, f in self.files.items()
            ],
        }


# JSON a dataset repository holds about itself, not rows (`datasets`' metadata and save_to_disk)
_METADATA = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}


def is_data_file(path: str) -> bool:
    """Whether `path` in a dataset repository holds rows malt reads."""
    parts = path.split("/")
    return (
        path.lower().endswith(DATA_SUFFIXES)
        and parts[-1].lower() not in _METADATA
        and not any(part.startswith(".") for part in parts)
    )


def pulled_commit(cache_dir: Path, repo: str, revision: str) -> str | None:
    """The commit a finished pull of `repo` at `revision` left in the cache, or None; no
    network (a pinned commit needs no ref: its snapshot folder is the proof)."""
    folder = repo_folder(cache_dir, repo, REPO_TYPE)
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        try:
            commit = (folder / "refs" / revision).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    if not commit or not (folder / "snapshots" / commit).is_dir():
        return None
    return None if _unfinished(cache_dir, repo, commit).exists() else commit


def _unfinished(cache_dir: Path, repo: str, commit: str) -> Path:
    """The marker of a pull of `commit` under way or stopped: a pinned commit has no ref to
    write last, so this says its snapshot is not whole yet. It sits with the lock files,
    where huggingface_hub's tools look for nothing else."""
    return cache_dir / ".locks" / repo_folder(cache_dir, repo, REPO_TYPE).name / f"{commit}.pulling"


def _list_files(cfg: HubConfig, ref: DatasetRef) -> tuple[str, list[str]]:
    """(commit, every file's repository path) at `ref.revision`, from the Hub's API."""
    url = (
        f"{cfg.endpoint}/api/datasets/{ref.repo}/revision/"
        f"{urllib.parse.quote(ref.revision, safe='')}"
    )
    t = Target(ref.repo, "", ref.revision, ref.display, REPO_TYPE)
    try:
        info = get_json(cfg, url, t)
    except (Unreachable, Transient) as exc:
        raise MaltError(
            f"cannot reach the Hugging Face Hub at {cfg.endpoint} ({exc}): check the network"
        ) from None
    commit = info.get("sha") if isinstance(info, dict) else None
    siblings = info.get("siblings") if isinstance(info, dict) else None
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise MaltError(f"{cfg.endpoint} sent no usable commit for {ref.repo}: refused")
    if not isinstance(siblings, list):
        raise MaltError(f"{cfg.endpoint} sent no file list for {ref.repo}: refused")
    names = [s.get("rfilename") for s in siblings if isinstance(s, dict)]
    files = [n for n in names if isinstance(n, str) and n and not n.startswith("/")]
    if any(".." in n.split("/") for n in files):
        raise MaltError(f"{cfg.endpoint} listed a path with '..' in {ref.repo}: refused")
    return commit, files


def pull_dataset(
    ref: DatasetRef, cfg: HubConfig | None = None, *, progress: Progress | None = None
) -> DatasetPull:
    """Fetch and verify `ref`'s card and data files, then point ``refs/<revision>`` at them."""
    cfg = cfg or HubConfig.from_env()
    progress = progress or NullProgress()
    folder = repo_folder(cfg.cache_dir, ref.repo, REPO_TYPE)
    if cfg.offline:
        commit = pulled_commit(cfg.cache_dir, ref.repo, ref.revision)
        if commit is None:
            raise MaltError(
                f"HF_HUB_OFFLINE is set and {ref.repo} is not in the cache ({cfg.cache_dir}): "
                "unset HF_HUB_OFFLINE to download it"
            )
        return DatasetPull(ref, commit, folder / "snapshots" / commit, offline=True)
    commit, files = _list_files(cfg, ref)
    data = sorted(f for f in files if is_data_file(f))
    if not data:
        raise MaltError(
            f"{ref.repo} has no data files malt reads at revision '{ref.revision}' "
            f"(expected {', '.join(DATA_SUFFIXES)})"
        )
    wanted = ([CARD] if CARD in files else []) + data
    unfinished = _unfinished(cfg.cache_dir, ref.repo, commit)
    cache_dirs(cfg.cache_dir, unfinished.parent.relative_to(cfg.cache_dir))
    refuse_symlink(unfinished)
    unfinished.touch()
    fetched: dict[str, Fetched] = {}
    for name in wanted:
        t = Target(ref.repo, name, commit, ref.display, REPO_TYPE)
        try:
            remote = head_file(cfg, t)
        except (Unreachable, Transient) as exc:
            raise MaltError(
                f"cannot reach the Hub at {cfg.endpoint} for {name} ({exc}); run "
                f"`malt pull {ref.display}` again to fetch what is missing"
            ) from None
        fetched[name] = fetch_blob(cfg, t, remote, progress, remote.sha256, check_git_blob=True)
    write_ref(folder, ref.revision, commit)
    unfinished.unlink()
    return DatasetPull(ref, commit, folder / "snapshots" / commit, fetched)
