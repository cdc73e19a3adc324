"""The HTTP side of a pull: what the Hub is asked and how its answers are read.

The protocol (see the reference, section 4): HEAD ``{endpoint}/{repo}/resolve/{rev}/{file}``;
follow same-host redirects; on a cross-host (CDN) redirect stop and read the metadata from the
3xx itself (``X-Repo-Commit``, ``X-Linked-Etag``, ``X-Linked-Size``); then GET the CDN URL
without the token (it never leaves the Hub's host). Every attempt starts with a fresh HEAD
because the CDN URLs are signed and expire.

Named `hub_http` rather than `http` so that it never reads as, or shadows, the standard library's
`http` package.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from malt_local import __version__
from malt_local.errors import MaltError
from malt_local.hashing import is_sha256
from malt_local.models.hf_cache import HubConfig

MAX_REDIRECTS = 10

# The server's answer names files in the cache (``blobs/<etag>``, ``snapshots/<commit>/``), so
# only what the Hub really sends is used: a git sha1 or an LFS sha256, a 40-hex commit.
_ETAG_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class Unreachable(Exception):
    """No answer from the server at all (refused, DNS, timeout, TLS)."""


class Transient(Exception):
    """A download attempt that failed in a way another attempt may not (cut, 5xx)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand 3xx back to us: the metadata lives on them and the token must not change hosts."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.lower()


def _headers(cfg: HubConfig, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {
        "User-Agent": f"malt/{__version__}; python/{sys.version_info[0]}.{sys.version_info[1]}",
        "Accept-Encoding": "identity",
    }
    if _host(url) == _host(cfg.endpoint):
        # HF_ENDPOINT's own user:password (Basic) is the more specific credential of the two.
        if cfg.endpoint_auth:
            headers["Authorization"] = cfg.endpoint_auth
        elif cfg.token:
            headers["Authorization"] = f"Bearer {cfg.token}"
    headers.update(extra or {})
    return headers


def error_reason(exc: BaseException) -> str:
    """A network error as a few words ("connection refused", "timed out", ...)."""
    reason: Any = getattr(exc, "reason", None) or exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "timed out"
    text = getattr(reason, "strerror", None) or str(reason) or reason.__class__.__name__
    return " ".join(str(text).split())


def _open(url: str, method: str, headers: dict[str, str], timeout: float) -> Any:
    """One request, no redirects followed; a 4xx/5xx comes back as a response, not raised."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        return exc
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise Unreachable(error_reason(exc)) from exc


@dataclass(frozen=True)
class RemoteFile:
    """What a HEAD on the resolve URL says about one file."""

    url: str  # what to GET: the resolve URL, or the CDN URL it redirects to
    commit: str
    etag: str
    size: int | None

    @property
    def sha256(self) -> str | None:
        """The ETag of an LFS file is its sha256; a small git file's is not."""
        return self.etag if is_sha256(self.etag) else None


@dataclass(frozen=True)
class Target:
    """One file of one Hub repository at a revision: what a pull asks the Hub about."""

    repo: str
    file: str
    revision: str
    display: str  # what the user typed, for "run `malt pull X` again"
    repo_type: str = "model"  # or "dataset": its URLs and cache folder say so


def resolve_url(
    endpoint: str, repo: str, file: str, revision: str, repo_type: str = "model"
) -> str:
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return (
        f"{endpoint}/{prefix}{repo}/resolve/{urllib.parse.quote(revision, safe='')}/"
        f"{urllib.parse.quote(file)}"
    )


def http_error(cfg: HubConfig, status: int, headers: Any, t: Target) -> MaltError:
    """One line for each way the Hub says no; 5xx and 429 are left to the caller."""
    code = headers.get("X-Error-Code", "") or ""
    message = " ".join((headers.get("X-Error-Message", "") or "").split())
    where = f"{cfg.endpoint}/{'' if t.repo_type == 'model' else t.repo_type + 's/'}{t.repo}"
    if code == "GatedRepo" or (status == 403 and "gated" in message.lower()):
        return MaltError(
            f"{t.repo} is a gated repository: accept its licence at {where} while logged in, "
            "then set HF_TOKEN to a token of that account (or run `hf auth login`)"
        )
    if status == 401 and cfg.token and code != "RepoNotFound":
        return MaltError(
            f"the Hub refused the token (401{': ' + message if message else ''}): "
            "check HF_TOKEN, or unset it for public models"
        )
    if code == "RepoNotFound" or status == 401:
        hint = "check the name" + ("" if cfg.token else ", or set HF_TOKEN if it is private")
        return MaltError(f"repository '{t.repo}' not found on the Hub ({hint})")
    if code == "RevisionNotFound":
        return MaltError(f"revision '{t.revision}' not found in {t.repo}")
    if code == "EntryNotFound" or status == 404:
        return MaltError(f"file '{t.file}' not found in {t.repo} at revision '{t.revision}'")
    if status == 403:
        return MaltError(
            f"the Hub refused access to {t.repo}/{t.file} (403"
            f"{': ' + message if message else ''}): check that HF_TOKEN can read it"
        )
    return MaltError(
        f"the Hub answered HTTP {status} for {t.repo}/{t.file}{': ' + message if message else ''}"
    )


def _strip_etag(value: str) -> str:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _check_status(cfg: HubConfig, status: int, headers: Any, t: Target) -> None:
    """Nothing for a success; `Transient` for 429 and 5xx (another try may work), else the
    one line `http_error` makes of the refusal."""
    if status == 429 or status >= 500:
        raise Transient(f"the Hub answered HTTP {status}")
    if status >= 400:
        raise http_error(cfg, status, headers, t)


def head_file(cfg: HubConfig, t: Target) -> RemoteFile:
    """HEAD the resolve URL: commit, ETag (the sha256 of LFS files), size and where to GET."""
    url = resolve_url(cfg.endpoint, t.repo, t.file, t.revision, t.repo_type)
    for _ in range(MAX_REDIRECTS):
        response = _open(url, "HEAD", _headers(cfg, url), cfg.etag_timeout)
        with contextlib.closing(response):
            status, headers = response.getcode(), response.headers
        if 300 <= status < 400 and headers.get("Location"):
            target = urllib.parse.urljoin(url, headers["Location"])
            if _host(target) == _host(url):
                url = target  # a renamed repository, a revision alias: same Hub, follow
                continue
            return _remote_from(cfg, headers, target, redirected=True, t=t)
        _check_status(cfg, status, headers, t)
        return _remote_from(cfg, headers, url, redirected=False, t=t)
    raise MaltError(f"too many redirects for {t.repo}/{t.file} at {cfg.endpoint}")


def _remote_from(cfg: HubConfig, headers: Any, url: str, redirected: bool, t: Target) -> RemoteFile:
    commit = headers.get("X-Repo-Commit")
    etag = _strip_etag(headers.get("X-Linked-Etag") or headers.get("ETag") or "")
    if not commit or not etag:
        missing = "X-Repo-Commit" if not commit else "ETag"
        raise MaltError(
            f"{cfg.endpoint} sent no {missing} for {t.repo}/{t.file}: "
            "is HF_ENDPOINT a Hugging Face Hub?"
        )
    if not _COMMIT_RE.match(commit):
        raise MaltError(
            f"{cfg.endpoint} sent an unusable X-Repo-Commit {commit[:80]!r} for "
            f"{t.repo}/{t.file} (not 40 hex digits): refused, nothing was written"
        )
    if not _ETAG_RE.match(etag):
        raise MaltError(
            f"{cfg.endpoint} sent an unusable ETag {etag[:80]!r} for {t.repo}/{t.file} "
            "(not a sha1 or sha256): refused, nothing was written"
        )
    raw_size = headers.get("X-Linked-Size")
    if raw_size is None and not redirected:
        raw_size = headers.get("Content-Length")
    try:
        size = int(raw_size) if raw_size is not None else None
    except ValueError:
        size = None
    return RemoteFile(url=url, commit=commit, etag=etag, size=size)


def open_get(cfg: HubConfig, url: str, offset: int) -> Any:
    """GET, following redirects ourselves so the token is dropped when the host changes."""
    extra = {"Range": f"bytes={offset}-"} if offset else {}
    for _ in range(MAX_REDIRECTS):
        response = _open(url, "GET", _headers(cfg, url, extra), cfg.download_timeout)
        status = response.getcode()
        if 300 <= status < 400 and response.headers.get("Location"):
            response.close()
            url = urllib.parse.urljoin(url, response.headers["Location"])
            continue
        return response
    raise Transient("too many redirects")


def content_range_start(value: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes N-...`` header, or None."""
    match = re.match(r"^\s*bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


MAX_JSON_BYTES = 64 << 20  # a repository listing: large datasets list tens of thousands of files


def get_json(cfg: HubConfig, url: str, t: Target) -> Any:
    """GET a Hub API URL and parse its JSON; same-host redirects (a renamed repository) are
    followed, a refusal is `http_error`'s one line, no answer at all `Unreachable`."""
    for _ in range(MAX_REDIRECTS):
        response = _open(url, "GET", _headers(cfg, url), cfg.etag_timeout)
        with contextlib.closing(response):
            status, headers = response.getcode(), response.headers
            if 300 <= status < 400 and headers.get("Location"):
                target = urllib.parse.urljoin(url, headers["Location"])
                if _host(target) != _host(url):
                    raise MaltError(f"{cfg.endpoint} redirected the listing of {t.repo} elsewhere")
                url = target
                continue
            _check_status(cfg, status, headers, t)
            try:
                body = response.read(MAX_JSON_BYTES + 1)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise Transient(f"connection lost: {error_reason(exc)}") from None
        if len(body) > MAX_JSON_BYTES:
            raise MaltError(f"the Hub's listing of {t.repo} is larger than {MAX_JSON_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise MaltError(
                f"{cfg.endpoint} answered the listing of {t.repo} with something that is not "
                "JSON: is HF_ENDPOINT a Hugging Face Hub?"
            ) from None
    raise MaltError(f"too many redirects listing {t.repo} at {cfg.endpoint}")
