"""The HTTP side of `malt view`: a small threaded server of malt's own on the standard library.

Why not a Datasette plugin: the pages need malt's own rules (export's DPO pairing, eval's
scoring), which run in Python over whole trees rather than as SQL; a plugin would pull
Datasette and its dependencies into the install for four pages, and Datasette's own pages would
sit next to them with their own scripts. This server needs nothing beyond the core install
(Jinja2 is already there), ships its one stylesheet in the package, and can be locked down
completely: no JavaScript at all, so the Content-Security-Policy says `script-src 'none'`. Plain
Datasette still works on the same file (`datasette "$(malt db path)"`).

Safety: each request opens its own read-only connection (`storage.open_read_only`: SQLite's
`mode=ro`, or `immutable=1` on read-only media), so the view can never write, and reads a
consistent WAL snapshot while `malt run` writes. Templates autoescape, so questions and model
outputs are shown as text (bytes that are not UTF-8 as U+FFFD). When bound to a loopback
address, requests whose Host header names another host are refused (a DNS-rebinding page cannot
read the data).
"""

from __future__ import annotations

import ipaddress
import re
import sys
import threading
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from malt_local import __version__
from malt_local.errors import MaltError
from malt_local.roles import ROLES
from malt_local.view import data, pages
from malt_local.view.storage import open_read_only

HERE = Path(__file__).resolve().parent
STATIC = {"view.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
CSP = (
    "default-src 'none'; script-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_ID = r"([A-Za-z0-9_.:-]+)"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def environment() -> Environment:
    """Jinja with autoescaping on for every template: data is text, never markup."""
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(roles=ROLES, version=__version__)
    env.filters["num"] = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["short"] = lambda s, n=80: s if len(s) <= n else s[: n - 1] + "…"
    return env


class ViewServer(ThreadingHTTPServer):
    """Serves one database read-only; `train` is a `malt train` output folder, if given."""

    daemon_threads = True

    def __init__(self, db_path: Path, host: str, port: int, train: Path | None = None) -> None:
        open_read_only(db_path).close()  # a bad path or a non-malt file fails before binding
        self.db_path = db_path
        self.train = train
        self.env = environment()
        for name in self.env.list_templates():  # compiled now, not on each page's first request
            self.env.get_template(name)
        self.figures = data.FiguresCache()  # run figures, kept while the data is unchanged
        self.loopback = is_loopback(host)
        try:
            super().__init__((host, port), Handler)
        except OSError as exc:
            raise MaltError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else str(host)
        return f"http://{shown}:{port}/"

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread


ROUTES: list[tuple[re.Pattern[str], str, bool]] = [
    # (path pattern, page function name, whether the first group is a run id)
    (re.compile(r"/"), "index", False),
    (re.compile(rf"/run/{_ID}"), "run", True),
    (re.compile(rf"/run/{_ID}/questions"), "questions", True),
    (re.compile(rf"/run/{_ID}/tree/{_ID}"), "tree", True),
    (re.compile(rf"/run/{_ID}/pairs"), "pairs", True),
    (re.compile(r"/evals"), "evaluations", False),
]


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    server_version = f"malt-view/{__version__}"
    sys_version = ""

    def do_HEAD(self) -> None:  # noqa: N802 (the standard library's name)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if self.server.loopback and not self._host_is_loopback():
            self._send(HTTPStatus.BAD_REQUEST, "text/plain", b"malt view: unexpected Host\n")
            return
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        path = urllib.parse.unquote(url.path)
        if path.startswith("/static/"):
            self._static(path[len("/static/") :])
            return
        try:
            page = self._page(path, params)
        except pages.NotFound as exc:
            self._error(HTTPStatus.NOT_FOUND, exc.format_message())
            return
        except MaltError as exc:
            self._error(HTTPStatus.BAD_REQUEST, exc.format_message())
            return
        except Exception:  # a bug: the traceback goes to the terminal, the browser gets a 500
            traceback.print_exc()
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "malt view failed: see its terminal")
            return
        if page is None:
            self._error(HTTPStatus.NOT_FOUND, f"no page at {path}")
            return
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode("utf-8"))

    def do_POST(self) -> None:  # noqa: N802
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "malt view is read-only")

    do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

    def _page(self, path: str, params: dict) -> str | None:
        """The rendered page at `path`, or None when no route matches."""
        page = self._route(path, params)
        if page is None:
            return None
        return self.server.env.get_template(page.template).render(**page.context, path=path)

    def _route(self, path: str, params: dict) -> pages.Page | None:
        if path == "/training":
            return pages.training(self.server.train, params)
        for pattern, name, has_run in ROUTES:
            m = pattern.fullmatch(path)
            if not m:
                continue
            store = open_read_only(self.server.db_path)
            try:
                args = m.groups()
                if has_run and store.run(args[0]) is None:
                    raise pages.NotFound(f"no run '{args[0]}' in {store.path}")
                extra = {"figures": self.server.figures} if name in ("index", "run") else {}
                return getattr(pages, name)(store, *args, params, **extra)
            finally:
                store.close()
        return None

    def _host_is_loopback(self) -> bool:
        host = self.headers.get("Host", "")
        try:
            name = urllib.parse.urlsplit("//" + host).hostname or ""
        except ValueError:  # '[::1' and other Hosts no URL can hold: not a loopback name
            return False
        return is_loopback(name)

    def _static(self, name: str) -> None:
        if name not in STATIC:
            self._error(HTTPStatus.NOT_FOUND, f"no file {name}")
            return
        body = (HERE / "static" / name).read_bytes()
        self._send(HTTPStatus.OK, STATIC[name], body, cache=True)

    def _error(self, status: HTTPStatus, message: str) -> None:
        body = self.server.env.get_template("error.html").render(
            status=int(status), reason=status.phrase, message=message, path=self.path
        )
        self._send(status, "text/html; charset=utf-8", body.encode("utf-8"))

    def _send(self, status: HTTPStatus, ctype: str, body: bytes, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in HEADERS.items():
            if k == "Cache-Control" and cache:
                v = "max-age=300"
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        sys.stderr.write(f"malt view: {self.address_string()} {format % args}\n")
