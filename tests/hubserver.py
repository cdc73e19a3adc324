"""A fake Hugging Face Hub on 127.0.0.1 that speaks the resolve protocol, for `malt pull` tests.

It serves `HEAD`/`GET /{org}/{repo}/resolve/{revision}/{file}` the way the Hub does (see
shared/reference/ecosystem.md section 4): `X-Repo-Commit`, `ETag` = the file's sha256,
`Accept-Ranges`, `Content-Length`, `206` + `Content-Range` for `Range: bytes=N-`, and 404/401/403
with `X-Error-Code`. `cdn=True` makes the HEAD answer like an LFS file on the real Hub: a 302 to
another host name (`localhost` instead of `127.0.0.1`) carrying `X-Linked-Etag` and
`X-Linked-Size`.

Dataset repositories (`add_dataset`) are served the same way under
`/datasets/{org}/{repo}/resolve/...`, with their file list at
`GET /api/datasets/{org}/{repo}/revision/{revision}` (`sha` and `siblings`, as the Hub answers);
a card (`README.md`) is a file kept in git, its ETag the git blob sha1, not a sha256.

Faults are switched on per test: cut the connection after K body bytes, stall after K bytes
(so a test can Ctrl-C or kill the client mid-body), flip one byte of the body, answer 200 to a
Range request, gate a repository, require a token, send a hostile commit or ETag. Every request is
recorded (method, path, host, Range, Authorization) so tests can assert what went over the wire.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    host: str
    range: str | None
    authorization: str | None


@dataclass
class Faults:
    cut_after: int | None = None  # close the connection after this many body bytes of a GET
    cut_count: int | None = None  # how many GETs to cut (None: every one)
    flip_byte_at: int | None = None  # absolute offset of a byte served corrupted
    ignore_range: bool = False  # answer 200 with the whole body to a Range request
    gated: set[str] = field(default_factory=set)  # repos answering 403 GatedRepo
    token: str | None = None  # when set, requests need `Authorization: Bearer <token>`
    status: int | None = None  # answer every resolve request with this bare status
    stall_after: int | None = None  # send this many body bytes, then wait for `release`
    commit: str | None = None  # a hostile server: send this X-Repo-Commit instead of COMMIT
    etag: str | None = None  # ... this ETag (X-Linked-Etag with cdn) instead of the sha256
    any_revision: bool = False  # serve every revision, not only main and COMMIT


class FakeHub:
    """`with FakeHub() as hub:` - hub.url is the endpoint to put in HF_ENDPOINT."""

    def __init__(self, *, cdn: bool = False) -> None:
        self.files: dict[tuple[str, str], bytes] = {}  # dataset repos are "datasets/ORG/NAME"
        self.git_files: set[tuple[str, str]] = set()  # served with a git sha1 ETag, no CDN
        self.faults = Faults()
        self.cdn = cdn
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self.stalled = threading.Event()  # set when a GET has sent stall_after bytes
        self.release = threading.Event()  # lets stalled GETs go on
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------------------

    def add(self, repo: str, file: str, data: bytes) -> str:
        self.files[(repo, file)] = data
        return hashlib.sha256(data).hexdigest()

    def add_dataset(self, repo: str, file: str, data: bytes, lfs: bool | None = None) -> str:
        """A file of dataset `repo`; `lfs` (default: anything but a .md) says how its ETag is
        made. Returns the file's sha256."""
        key = ("datasets/" + repo, file)
        self.files[key] = data
        if not (lfs if lfs is not None else not file.endswith(".md")):
            self.git_files.add(key)
        return hashlib.sha256(data).hexdigest()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what happened --------------------------------------------------------------------

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def gets(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET"]

    def heads(self) -> list[Request]:
        return [r for r in self.requests if r.method == "HEAD"]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def take_cut(self) -> bool:
        """Whether this GET is to be cut (and count it)."""
        with self._lock:
            f = self.faults
            if f.cut_after is None:
                return False
            if f.cut_count is None:
                return True
            if f.cut_count > 0:
                f.cut_count -= 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # -- routing --------------------------------------------------------------------------

    def _serve(self, body: bool) -> None:
        fake = self.fake
        fake.record(
            Request(
                method=self.command,
                path=self.path,
                host=self.headers.get("Host", ""),
                range=self.headers.get("Range"),
                authorization=self.headers.get("Authorization"),
            )
        )
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/blob/"):
            return self._serve_blob(path[len("/blob/") :], body)
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "datasets"] and len(parts) == 6 and parts[4] == "revision":
            return self._serve_listing("datasets/" + "/".join(parts[2:4]), parts[5])
        kind = ""
        if parts[:1] == ["datasets"]:
            kind, parts = "datasets/", parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound", "not a resolve URL")
        repo, revision, file = kind + "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        f = fake.faults
        if f.status is not None:
            return self._error(f.status, None, "injected")
        if f.token is not None and self.headers.get("Authorization") != f"Bearer {f.token}":
            if self.headers.get("Authorization"):
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._error(401, "RepoNotFound", "Repository not found")
        if not any(r == repo for r, _ in fake.files):
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo in f.gated:
            return self._error(
                403,
                "GatedRepo",
                f"Access to model {repo} is restricted and you are not in the authorized list.",
            )
        if revision not in ("main", COMMIT) and not f.any_revision:
            return self._error(404, "RevisionNotFound", "Invalid rev id", commit=False)
        data = fake.files.get((repo, file))
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        sha = hashlib.sha256(data).hexdigest()
        if (repo, file) in fake.git_files:
            git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            return self._send_file(data, git, body)
        if fake.cdn:
            host = f"localhost:{fake.port}"
            self.send_response(302)
            self.send_header("Location", f"http://{host}/blob/{sha}")
            self.send_header("X-Repo-Commit", f.commit or COMMIT)
            self.send_header("X-Linked-Etag", f.etag or f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", '"not-the-sha"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send_file(data, sha, body)

    def _serve_listing(self, repo: str, revision: str) -> None:
        """The Hub's `GET /api/datasets/{repo}/revision/{revision}`: the commit and its files."""
        fake, f = self.fake, self.fake.faults
        if f.token is not None and self.headers.get("Authorization") != f"Bearer {f.token}":
            return self._error(401, "RepoNotFound", "Repository not found")
        names = sorted(file for r, file in fake.files if r == repo)
        if not names:
            return self._error(404, "RepoNotFound", "Repository not found")
        if revision not in ("main", COMMIT) and not f.any_revision:
            return self._error(404, "RevisionNotFound", "Invalid rev id", commit=False)
        payload = json.dumps(
            {
                "id": repo.split("/", 1)[1],
                "sha": f.commit or COMMIT,
                "siblings": [{"rfilename": n} for n in names],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        return None

    def _serve_blob(self, sha: str, body: bool) -> None:
        for data in self.fake.files.values():
            if hashlib.sha256(data).hexdigest() == sha:
                return self._send_file(data, sha, body)
        return self._error(404, None, "no such blob")

    # -- answers --------------------------------------------------------------------------

    def _error(self, status: int, code: str | None, message: str, commit: bool = True) -> None:
        payload = message.encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if code == "EntryNotFound" and commit:
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_file(self, data: bytes, sha: str, body: bool) -> None:
        fake, f = self.fake, self.fake.faults
        start = 0
        header = self.headers.get("Range")
        if header and not f.ignore_range and header.startswith("bytes="):
            start = int(header[len("bytes=") :].split("-")[0])
        if start >= len(data) and start > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", f.commit or COMMIT)
        self.send_header("ETag", f.etag or f'"{sha}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        chunk = bytearray(data[start:])
        if f.flip_byte_at is not None and start <= f.flip_byte_at < len(data):
            chunk[f.flip_byte_at - start] ^= 0xFF
        if fake.take_cut():
            assert f.cut_after is not None
            self.wfile.write(bytes(chunk[: f.cut_after]))
            self.wfile.flush()
            self.close_connection = True
            # A hard cut, as a dropped link looks from the client: no more bytes, then EOF.
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if f.stall_after is not None:
            self.wfile.write(bytes(chunk[: f.stall_after]))
            self.wfile.flush()
            fake.stalled.set()
            fake.release.wait(30)
            with contextlib.suppress(OSError):  # the client may be gone (Ctrl-C, kill)
                self.wfile.write(bytes(chunk[f.stall_after :]))
            return
        self.wfile.write(bytes(chunk))
