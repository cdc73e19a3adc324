"""Verified, resumable GGUF downloads from the Hugging Face Hub, into the standard HF cache.

Why malt has its own downloader instead of calling `huggingface_hub.hf_hub_download`:

* hf_hub_download writes to a process-unique ``<etag>.<uuid>.incomplete`` and deletes it when
  the process fails, so a Ctrl-C, a dropped hotel connection or a reboot restarts a 4.9 GB
  download from zero. malt writes to ``blobs/<etag>.incomplete`` - a name the next process can
  find - and continues it with ``Range: bytes=N-``.
* hf_hub_download only checks the size. malt hashes every byte (the partial bytes of a resumed
  download included, streaming, so nothing is read twice) and compares the sha256 with the one
  pinned in models.toml, else with the Hub's ETag (for LFS files, which GGUFs are, the ETag *is*
  the sha256). A mismatch deletes the file. Only a verified file becomes ``blobs/<etag>``.

The cache layout and the environment are `hf_cache.py`'s, the requests `hub_http.py`'s; this
module decides what a pull does and leaves a record (`records.py`) of what it verified. A GGUF
already on disk is registered the same way, without network (`register_file`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from malt_local.diskspace import disk_guard
from malt_local.errors import MaltError
from malt_local.gguf import check_gguf
from malt_local.hashing import hash_into, is_sha256, sha256_file
from malt_local.models.hf_cache import (
    HubConfig,
    cache_dirs,
    download_lock,
    link_snapshot,
    refuse_symlink,
    refuse_symlinks,
    repo_folder,
    snapshot_file,
    write_ref,
)
from malt_local.models.hub_http import (
    RemoteFile,
    Target,
    Transient,
    Unreachable,
    content_range_start,
    error_reason,
    head_file,
    http_error,
    open_get,
)
from malt_local.models.records import (
    VERIFIED_ETAG,
    VERIFIED_MODELS_TOML,
    VERIFIED_NONE,
    VERIFIED_TRUSTED,
    Record,
    find_record,
    save_record,
)
from malt_local.models.spec import ModelSpec

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows
CHUNK = 1 << 20  # 1 MiB reads: large enough for speed, small enough for a smooth bar
FSYNC_EVERY = 64 << 20  # bytes between fsyncs: what a reboot may cost, not more


# --------------------------------------------------------------------------- progress


class Progress(Protocol):
    """Where a pull reports what it is doing; the CLI draws it, the library stays silent."""

    def start(self, description: str, total: int | None, completed: int = 0) -> None: ...

    def advance(self, n: int) -> None: ...

    def done(self) -> None: ...

    def note(self, message: str) -> None: ...


class NullProgress:
    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def done(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def human_size(n: int | None) -> str:
    """Decimal units, like the Hub's web pages and ollama ("4.9 GB")."""
    if n is None:
        return "unknown size"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


class PullInterrupted(Exception):
    """Ctrl-C during a download: the partial file is kept for the next `malt pull`."""

    def __init__(self, partial: Path, have: int, total: int | None) -> None:
        super().__init__(f"interrupted at {have} bytes")
        self.partial, self.have, self.total = partial, have, total


# --------------------------------------------------------------------------- files


def _verify(path: Path, progress: Progress, description: str) -> str:
    """The file's sha256, with the progress shown as `description`."""
    progress.start(description, path.stat().st_size)
    digest = sha256_file(path, progress.advance)
    progress.done()
    return digest


class _Partial:
    """The ``.incomplete`` file and the sha256 of exactly the bytes it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Unbuffered: every received chunk is in the file at once, so a kill or a power cut
        # loses at most what the kernel had not written yet, and a resume starts from there.
        # O_NOFOLLOW: a link planted at this name would send the download into its target.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
        self.fh: BinaryIO = os.fdopen(fd, "ab", buffering=0)
        self.hasher = hashlib.sha256()
        self.have = 0
        self.received = 0  # bytes this process got from the network
        self._unsynced = 0

    def hash_existing(self, limit: int | None, progress: Progress) -> int:
        """Hash the bytes a previous process left, so the final digest covers the whole file."""
        size = self.path.stat().st_size
        if size == 0 or (limit is not None and size > limit):
            self.reset()
            return 0
        progress.start("checking the partial download", size)
        self.have += hash_into(self.hasher, self.path, progress.advance)
        progress.done()
        return self.have

    def reset(self) -> None:
        self.fh.truncate(0)
        self.fh.seek(0)
        self.hasher = hashlib.sha256()
        self.have = 0

    def append(self, chunk: bytes) -> None:
        # An unbuffered write may take part of a chunk (a disk filling up): write the rest, so
        # the error comes from the write that finds no room, with the file a prefix of the blob.
        view = memoryview(chunk)
        while view:
            written = self.fh.write(view)
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            view = view[written:]
        self.hasher.update(chunk)
        self.have += len(chunk)
        self.received += len(chunk)
        self._unsynced += len(chunk)
        if self._unsynced >= FSYNC_EVERY:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fh.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if not self.fh.closed:
            with contextlib.suppress(OSError):
                self.sync()
            self.fh.close()


def _check_space(folder: Path, total: int | None, have: int) -> None:
    if total is None:
        return
    need = total - have
    free = shutil.disk_usage(folder).free
    if need > free:
        raise MaltError(
            f"not enough disk space in {folder}: the download needs {human_size(need)} more, "
            f"{human_size(free)} is free (free some space, or point HF_HUB_CACHE at a bigger disk)"
        )


# --------------------------------------------------------------------------- pulling


@dataclass(frozen=True)
class PullResult:
    """What `malt pull` did and the record it left."""

    record: Record
    action: str  # downloaded | resumed | cached | registered
    transferred: int = 0  # body bytes received by this process
    resumed_from: int | None = None  # byte offset a resumed download started at

    def as_dict(self) -> dict[str, Any]:
        r = self.record
        return {
            "alias": r.alias,
            "quant": r.quant,
            "repo": r.repo,
            "file": r.file,
            "revision": r.revision,
            "commit": r.commit,
            "path": r.path,
            "sha256": r.sha256,
            "size": r.size,
            "verified_against": r.verified_against,
            "source": r.source,
            "action": self.action,
            "bytes_transferred": self.transferred,
            "resumed_from": self.resumed_from,
        }


def _make_record(
    spec: ModelSpec, path: Path, sha: str, against: str, source: str, commit: str | None
) -> Record:
    st = path.stat()
    return Record(
        repo=spec.repo,
        file=spec.file,
        path=str(path.absolute()),
        sha256=sha,
        size=st.st_size,
        verified_against=against,
        source=source,
        alias=spec.alias,
        quant=spec.quant,
        revision=spec.revision if source == "hub" else None,
        commit=commit,
        mtime_ns=st.st_mtime_ns,
    )


def _usable_record(spec: ModelSpec, home: Path | None) -> Record | None:
    """A record that lets a pull end without touching the file or the network."""
    record = find_record(spec.repo, spec.file, home)
    if record is None or record.verified_against == VERIFIED_TRUSTED:
        return None
    if record.problem(check_mtime=True) is not None:
        return None
    if spec.sha256 and record.sha256 != spec.sha256:
        return None
    return record


def _unreachable_error(cfg: HubConfig, spec: ModelSpec, reason: str) -> MaltError:
    return MaltError(
        f"cannot reach the Hugging Face Hub at {cfg.endpoint} ({reason}): check the network, "
        f"or copy the GGUF over and run `malt pull {spec.display} --file PATH`"
    )


def pull(
    spec: ModelSpec,
    cfg: HubConfig | None = None,
    *,
    progress: Progress | None = None,
    home: Path | None = None,
) -> PullResult:
    """Make `spec`'s file present and verified in the HF cache, and record it.

    Order of preference: a record whose file is unchanged (no network when the catalog pins
    the sha256; otherwise one HEAD to see whether the Hub's file is still the same); a verified
    blob already in the cache (from an earlier pull, `hf download` or llama.cpp); the partial
    download a previous process left; a fresh download.
    """
    cfg = cfg or HubConfig.from_env()
    progress = progress or NullProgress()
    t = Target(spec.repo, spec.file, spec.revision, spec.display)
    usable = _usable_record(spec, home)

    if cfg.offline:
        if usable is not None:
            return PullResult(usable, "cached")
        cached = _from_cache(cfg, spec, progress, home)
        if cached is not None:
            return cached
        raise MaltError(
            f"HF_HUB_OFFLINE is set and {spec.display} is not in the cache "
            f"({cfg.cache_dir}): unset HF_HUB_OFFLINE to download it, or run "
            f"`malt pull {spec.display} --file PATH`"
        )
    if usable is not None and spec.sha256:
        return PullResult(usable, "cached")  # pinned and unchanged: nothing to ask the Hub

    try:
        remote = head_file(cfg, t)
    except MaltError as exc:
        if usable is None:
            raise
        # Renamed upstream, token revoked...: the verified copy here is still what was asked.
        progress.note(f"{exc.format_message()}; using the copy verified {usable.recorded_at}")
        return PullResult(usable, "cached")
    except (Unreachable, Transient) as exc:
        if usable is not None:
            progress.note(
                f"cannot reach the Hub ({exc}); using the copy verified {usable.recorded_at}"
            )
            return PullResult(usable, "cached")
        cached = _from_cache(cfg, spec, progress, home)
        if cached is not None:
            progress.note(f"cannot reach the Hub ({exc}); using the copy in the cache")
            return cached
        raise _unreachable_error(cfg, spec, str(exc)) from None

    if spec.sha256 and remote.sha256 and remote.sha256 != spec.sha256:
        raise MaltError(
            f"{spec.repo}/{spec.file} at revision '{spec.revision}' has sha256 {remote.sha256} on "
            f"the Hub but models.toml pins {spec.sha256}: the file changed upstream; pin the old "
            "revision or update the sha256 in your models.toml"
        )
    if usable is not None and remote.sha256 and usable.sha256 == remote.sha256:
        if usable.verified_against == VERIFIED_NONE or usable.commit != remote.commit:
            usable = replace(usable, verified_against=VERIFIED_ETAG, commit=remote.commit)
            save_record(usable, home)
        return PullResult(usable, "cached")
    if spec.size and remote.size and spec.size != remote.size and not spec.sha256:
        progress.note(
            f"note: the Hub says {remote.size} bytes, models.toml {spec.size}; using the Hub's"
        )
    return _download(cfg, spec, t, remote, progress, home)


def _download(
    cfg: HubConfig,
    spec: ModelSpec,
    t: Target,
    remote: RemoteFile,
    progress: Progress,
    home: Path | None,
) -> PullResult:
    expected = spec.sha256 or remote.sha256
    against = (
        VERIFIED_MODELS_TOML if spec.sha256 else VERIFIED_ETAG if remote.sha256 else VERIFIED_NONE
    )
    fetched = fetch_blob(cfg, t, remote, progress, expected)
    write_ref(repo_folder(cfg.cache_dir, spec.repo), spec.revision, remote.commit)
    record = _make_record(spec, fetched.snapshot, fetched.sha256, against, "hub", remote.commit)
    save_record(record, home)
    return PullResult(record, fetched.action, fetched.transferred, fetched.resumed_from)


@dataclass(frozen=True)
class Fetched:
    """One file of a Hub repository, verified in the cache: what `fetch_blob` did."""

    snapshot: Path  # snapshots/<commit>/<file>, a link to its blob
    sha256: str
    action: str  # downloaded | resumed | cached
    transferred: int = 0
    resumed_from: int | None = None


def _git_blob_sha1(path: Path) -> str:
    """The git object id of a file's bytes: the Hub's ETag for a file kept in git, not LFS."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    hash_into(h, path)
    return h.hexdigest()


def fetch_blob(
    cfg: HubConfig,
    t: Target,
    remote: RemoteFile,
    progress: Progress,
    expected: str | None,
    *,
    check_git_blob: bool = False,
) -> Fetched:
    """Make ``blobs/<etag>`` and ``snapshots/<commit>/<file>`` for one file of `t.repo`, verified.

    `expected` is the sha256 the bytes must have (None: nothing to check them against). With
    `check_git_blob`, a file without a sha256 whose ETag is a git sha1 (a small file kept in git,
    like a dataset card) is checked against that instead. A blob already in the cache is reused,
    a partial ``.incomplete`` continued; what fails its check is deleted. The caller writes the
    ref (a dataset's ref waits until all its files are in) and any record.
    """
    folder = repo_folder(cfg.cache_dir, t.repo, t.repo_type)
    # Every folder the pull writes in, checked before the first byte: none may be a link.
    blobs = cache_dirs(cfg.cache_dir, Path(folder.name, "blobs"))
    refuse_symlinks(folder, Path("snapshots", remote.commit, t.file).parent)
    refuse_symlinks(folder, Path("refs", t.revision).parent)
    blob = blobs / remote.etag
    git_sha1 = check_git_blob and expected is None and len(remote.etag) == 40

    def good(path: Path, digest: str) -> bool:
        if git_sha1:
            return _git_blob_sha1(path) == remote.etag
        return expected is None or digest == expected

    with download_lock(cfg.cache_dir, t.repo, remote.etag, t.repo_type):
        if blob.is_file():
            digest = _verify(blob, progress, f"verifying {t.display}")
            if good(blob, digest):
                return Fetched(link_snapshot(folder, remote.commit, t.file, blob), digest, "cached")
            blob.unlink()
            progress.note(f"the cached copy {blob} was corrupt (sha256 {digest}): deleted it")
        part = blobs / f"{remote.etag}.incomplete"
        refuse_symlink(part)
        what = f"{t.display}: " if t.repo_type == "model" else ""  # an alias, or the path alone
        progress.note(f"pulling {what}{t.repo}/{t.file} ({human_size(remote.size)})")
        with disk_guard(part):
            digest, transferred, resumed_from = _fetch(cfg, t, remote, part, progress)
        if not good(part, digest):
            kind, digest = ("git sha1", _git_blob_sha1(part)) if git_sha1 else ("sha256", digest)
            part.unlink(missing_ok=True)
            raise MaltError(
                f"{kind} mismatch for {t.file}: expected {remote.etag if git_sha1 else expected}, "
                f"got {digest}; "
                f"the corrupt download was deleted, run `malt pull {t.display}` again"
            )
        os.replace(part, blob)
        snapshot = link_snapshot(folder, remote.commit, t.file, blob)
    action = "resumed" if resumed_from else "downloaded"
    return Fetched(snapshot, digest, action, transferred, resumed_from)


def _fetch(
    cfg: HubConfig, t: Target, remote: RemoteFile, part_path: Path, progress: Progress
) -> tuple[str, int, int | None]:
    """Fill `part_path` to `remote.size` bytes, resuming; returns (sha256, received, resumed at)."""
    part = _Partial(part_path)
    try:
        resumed_from = part.hash_existing(remote.size, progress) or None
        if resumed_from:
            progress.note(f"resuming at {human_size(resumed_from)} of {human_size(remote.size)}")
        _check_space(part_path.parent, remote.size, part.have)
        url, failures = remote.url, 0
        while True:
            before = part.received
            try:
                _get_into(cfg, t, url, part, remote.size, progress)
                break
            except Transient as exc:
                # Consecutive failures without a byte of progress end the attempt; a flaky link
                # that keeps delivering keeps going.
                failures = 1 if part.received > before else failures + 1
                if failures > cfg.retries:
                    raise MaltError(
                        f"download of {t.file} stopped at {human_size(part.have)} of "
                        f"{human_size(remote.size)} ({exc}); run `malt pull {t.display}` again "
                        "to resume"
                    ) from None
                progress.note(f"{exc}; retrying from byte {part.have}")
                time.sleep(cfg.retry_wait * 2 ** (failures - 1))
                with contextlib.suppress(Unreachable, Transient, MaltError):
                    url = head_file(cfg, t).url  # signed CDN URLs expire: ask again
        part.sync()
        return part.hasher.hexdigest(), part.received, resumed_from
    except KeyboardInterrupt:
        part.close()
        raise PullInterrupted(part_path, part.have, remote.size) from None
    finally:
        part.close()


def _get_into(
    cfg: HubConfig, t: Target, url: str, part: _Partial, total: int | None, progress: Progress
) -> None:
    """One GET from `part.have` on, appended to `part`; Transient when the attempt broke."""
    offset = part.have
    if total is not None and offset == total:
        return
    try:
        response = open_get(cfg, url, offset)
    except Unreachable as exc:
        raise Transient(str(exc)) from None
    with contextlib.closing(response):
        status = response.getcode()
        if status == 416:  # our partial is not a prefix the server can continue
            part.reset()
            raise Transient("the server refused to resume (HTTP 416); starting again")
        if status == 429 or status >= 500:
            raise Transient(f"the server answered HTTP {status}")
        if status >= 400:
            raise http_error(cfg, status, response.headers, t)
        if status == 206:
            start = content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.reset()
                raise Transient(f"the server resumed at byte {start}, not {offset}")
        elif offset:
            progress.note("the server ignored the resume request (HTTP 200): starting from zero")
            part.reset()
        progress.start(t.display, total, part.have)
        read = getattr(response, "read1", response.read)  # what has arrived, not a full MiB
        while True:
            try:
                chunk = read(CHUNK)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise Transient(f"connection lost: {error_reason(exc)}") from None
            if not chunk:
                break
            part.append(chunk)  # a write error (disk full) is not transient: it propagates
            progress.advance(len(chunk))
            if total is not None and part.have > total:
                part.reset()
                raise MaltError(
                    f"the server sent more than the {total} bytes it announced for {t.file}"
                )
        progress.done()
        cut = bool(getattr(response, "length", None))  # bytes of Content-Length never came
    if cut or (total is not None and part.have < total):
        raise Transient("the connection closed early")


def _from_cache(
    cfg: HubConfig, spec: ModelSpec, progress: Progress, home: Path | None
) -> PullResult | None:
    """The file in the HF cache for `spec.revision`, verified and recorded, without network.

    Picks up files fetched by an earlier pull whose record was lost, by `hf download` or by
    llama.cpp -hf.
    """
    found = snapshot_file(repo_folder(cfg.cache_dir, spec.repo), spec.revision, spec.file)
    if found is None:
        return None
    commit, snapshot = found
    blob = Path(os.path.realpath(snapshot))
    expected = spec.sha256 or (blob.name if is_sha256(blob.name) else None)
    against = VERIFIED_MODELS_TOML if spec.sha256 else VERIFIED_ETAG if expected else VERIFIED_NONE
    digest = _verify(snapshot, progress, f"verifying {spec.display}")
    if expected is not None and digest != expected:
        # Only a blob of this cache is deleted: a snapshot link may point anywhere.
        if blob.parent == Path(os.path.realpath(repo_folder(cfg.cache_dir, spec.repo) / "blobs")):
            blob.unlink(missing_ok=True)
        if snapshot.is_symlink():
            snapshot.unlink()
        raise MaltError(
            f"the cached copy of {spec.display} was corrupt (sha256 {digest}, expected "
            f"{expected}) and was deleted: run `malt pull {spec.display}` with a network, or "
            f"`malt pull {spec.display} --file PATH`"
        )
    record = _make_record(spec, snapshot, digest, against, "hub", commit)
    save_record(record, home)
    return PullResult(record, "cached")


def register_file(
    spec: ModelSpec,
    path: Path,
    *,
    trust: bool = False,
    progress: Progress | None = None,
    home: Path | None = None,
) -> PullResult:
    """Record a GGUF already on disk as `spec` (the air-gapped path); no network.

    The file stays where it is (copy it somewhere permanent first: a USB stick goes away).
    Its sha256 must match the one models.toml pins unless `trust`; with no pin there is
    nothing to check and the record says so.
    """
    progress = progress or NullProgress()
    path = path.expanduser()
    check_gguf(path)
    size = path.stat().st_size
    if spec.sha256 and spec.size and size != spec.size and not trust:
        raise MaltError(
            f"{path} is {size} bytes but models.toml says {spec.display} is {spec.size}: "
            "wrong file? (pass --trust to register it anyway)"
        )
    digest = _verify(path, progress, f"verifying {path.name}")
    if spec.sha256 is None:
        against = VERIFIED_NONE
        progress.note(
            f"models.toml pins no sha256 for {spec.display}: recorded sha256 {digest} "
            "without checking it"
        )
    elif digest == spec.sha256:
        against = VERIFIED_MODELS_TOML
    elif trust:
        against = VERIFIED_TRUSTED
        progress.note(
            f"warning: sha256 {digest} differs from models.toml ({spec.sha256}); "
            "registered anyway (--trust)"
        )
    else:
        raise MaltError(
            f"sha256 mismatch for {path}: models.toml expects {spec.sha256}, the file has "
            f"{digest} (pass --trust to register it anyway)"
        )
    record = _make_record(spec, path.resolve(), digest, against, "file", None)
    save_record(record, home)
    return PullResult(record, "registered")
