"""The Hugging Face side of this machine: the environment huggingface_hub reads and the cache
layout it writes.

The result of a pull is the layout huggingface_hub and llama.cpp's ``-hf`` share, so each reuses
the other's downloads: ``models--OWNER--REPO/{blobs/<etag>, refs/<revision>,
snapshots/<commit>/<file> -> ../../blobs/<etag>}``. The environment variables users know
(``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``,
``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``) mean what they mean there; they are read
when a command runs, with huggingface_hub's precedence, rather than at import (`HubConfig`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.errors import MaltError, clean_secret, split_url_credentials
from malt_local.models.filelock import LockHeld, exclusive_lock

DEFAULT_ENDPOINT = "https://huggingface.co"

_TRUE = {"1", "ON", "YES", "TRUE"}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where links need privileges


# --------------------------------------------------------------------------- configuration


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in _TRUE


def _expand(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The HF hub cache, with huggingface_hub.constants' precedence, read now (not at import).

    HF_HUB_CACHE > HUGGINGFACE_HUB_CACHE > $HF_HOME/hub > $XDG_CACHE_HOME/huggingface/hub >
    ~/.cache/huggingface/hub - the same folder llama.cpp's -hf uses when LLAMA_CACHE is unset.
    """
    env = os.environ if env is None else env
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return _expand(env[name])
    return hf_home(env) / "hub"


def hf_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("HF_HOME"):
        return _expand(env["HF_HOME"])
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return _expand(xdg) / "huggingface"


def _token(env: Mapping[str, str]) -> str | None:
    """HF_TOKEN (or the legacy name), else the token `hf auth login` saved."""
    name = "HF_TOKEN" if env.get("HF_TOKEN") else "HUGGING_FACE_HUB_TOKEN"
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if not token and not _is_true(env.get("HF_HUB_DISABLE_IMPLICIT_TOKEN")):
        path = _expand(env["HF_TOKEN_PATH"]) if env.get("HF_TOKEN_PATH") else hf_home(env) / "token"
        name = f"the token file {path}"
        with contextlib.suppress(OSError):
            token = path.read_text(encoding="utf-8")
    return clean_secret(token, name)


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        return float(env.get(name) or default)
    except ValueError:
        raise MaltError(f"{name} must be a number of seconds, not {env.get(name)!r}") from None


@dataclass(frozen=True)
class HubConfig:
    """Everything a pull needs from the environment, read once per command."""

    endpoint: str = DEFAULT_ENDPOINT
    cache_dir: Path = Path("~/.cache/huggingface/hub")
    token: str | None = field(default=None, repr=False)
    offline: bool = False
    etag_timeout: float = 10.0
    download_timeout: float = 10.0
    retries: int = 3  # in-process retries after a dropped connection (each resumes)
    retry_wait: float = 1.0  # seconds before the first retry; doubles each time
    # HTTP Basic `Authorization` from HF_ENDPOINT's ``user:password@`` (a mirror behind a
    # proxy); `endpoint` no longer holds them, so no message or record can show them.
    endpoint_auth: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HubConfig:
        env = os.environ if env is None else env
        try:
            retries = max(0, int(env.get("MALT_PULL_RETRIES") or 3))
        except ValueError:
            raise MaltError("MALT_PULL_RETRIES must be a whole number") from None
        endpoint, endpoint_auth = split_url_credentials(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
        return cls(
            endpoint=endpoint.rstrip("/"),
            endpoint_auth=endpoint_auth,
            cache_dir=hub_cache_dir(env),
            token=_token(env),
            offline=_is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")),
            etag_timeout=_float_env(env, "HF_HUB_ETAG_TIMEOUT", 10.0),
            download_timeout=_float_env(env, "HF_HUB_DOWNLOAD_TIMEOUT", 10.0),
            retries=retries,
        )


# --------------------------------------------------------------------------- the cache layout


def repo_folder(cache_dir: Path, repo: str, repo_type: str = "model") -> Path:
    """``models--OWNER--REPO`` (or ``datasets--OWNER--NAME``), as huggingface_hub names it."""
    return cache_dir / (f"{repo_type}s--" + repo.replace("/", "--"))


def refuse_symlink(path: Path) -> None:
    """Refuse to write at `path` when it is a symbolic link: malt never makes one there, so
    it was planted, and writing through it would change a file outside the cache."""
    if path.is_symlink():
        raise MaltError(
            f"{path} is a symbolic link malt did not make: refusing to write through it "
            "(remove it and run `malt pull` again)"
        )


def refuse_symlinks(base: Path, relative: Path) -> None:
    """`refuse_symlink` for every folder below `base` on the way to `base / relative` that
    exists already; nothing is made."""
    path = base
    for part in relative.parts:
        path = path / part
        refuse_symlink(path)
        if not path.exists():
            return


def cache_dirs(cache_dir: Path, relative: Path) -> Path:
    """`cache_dir / relative`, each folder below `cache_dir` made if missing and refused if it
    is a symbolic link (the cache folder itself may be one: a cache moved to a bigger disk)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir
    for part in relative.parts:
        path = path / part
        refuse_symlink(path)
        path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def download_lock(
    cache_dir: Path, repo: str, etag: str, repo_type: str = "model"
) -> Iterator[None]:
    """One writer per blob. Same lock file huggingface_hub uses, so the two never collide."""
    lock_dir = cache_dirs(cache_dir, Path(".locks", repo_folder(cache_dir, repo, repo_type).name))
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(lock_dir / f"{etag}.lock", wait=False))
        except LockHeld:
            raise MaltError(
                f"another download of this file is running (lock {lock_dir / etag}.lock): "
                "wait for it to finish"
            ) from None
        yield


def link_snapshot(folder: Path, commit: str, file: str, blob: Path) -> Path:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, relative as huggingface_hub makes it."""
    snapshot = folder / "snapshots" / commit / file
    cache_dirs(folder, snapshot.parent.relative_to(folder))
    target = os.path.relpath(blob, snapshot.parent)
    if snapshot.is_symlink() and os.readlink(snapshot) == target:
        return snapshot
    if snapshot.is_symlink() or snapshot.exists():
        snapshot.unlink()
    try:
        os.symlink(target, snapshot)
    except OSError:  # no symlinks (some Windows setups): a hard link, else a copy
        try:
            os.link(blob, snapshot)
        except OSError:
            shutil.copyfile(blob, snapshot)
    return snapshot


def write_ref(folder: Path, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = folder / "refs" / revision
    cache_dirs(folder, ref.parent.relative_to(folder))
    with contextlib.suppress(OSError):
        if ref.read_text(encoding="utf-8").strip() == commit:
            return
    tmp = ref.with_name(ref.name + f".{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover, or a planted link: the link itself goes
    # O_EXCL | O_NOFOLLOW: a fresh file of ours, never a write through a link; os.replace then
    # replaces `ref` itself, link or not.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(commit)
    os.replace(tmp, ref)


def snapshot_file(folder: Path, revision: str, file: str) -> tuple[str, Path] | None:
    """(commit, snapshots/<commit>/<file>) for `revision` in a repository's cache folder, or
    None when the cache has no such file. A revision that is a commit needs no ref."""
    commit = revision if _COMMIT_RE.match(revision) else None
    if commit is None:
        with contextlib.suppress(OSError):
            commit = (folder / "refs" / revision).read_text(encoding="utf-8").strip()
    if not commit:
        return None
    snapshot = folder / "snapshots" / commit / file
    if not snapshot.is_file():
        return None
    return commit, snapshot
