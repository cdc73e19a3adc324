"""No secret anywhere: not on stdout or stderr, not in any file malt writes.

Distinctive secrets are planted where a user keeps them: the API key's variable, HF_TOKEN, a
password in `--endpoint http://user:PASS@...` and another in HF_ENDPOINT. Then the commands a
user runs are run (pull, models, run, eval, export, status, show) and the ways they fail
(an unreachable endpoint, a server answering 500, one refusing the key with 401, one echoing
the key back in a 400), and every output and every byte of every file under the test's folder
(databases with their -wal, the Hugging Face cache, pulled.json, the export) is searched for
each secret, and for the Basic-auth header it stands for.

The URL credentials must arrive as `Authorization: Basic ...`, never in the stored settings.
"""

from __future__ import annotations

import base64
import socket
import sqlite3
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from malt_local.cli import cli
from malt_local.engines.openai import engine as openai_engine
from malt_local.errors import split_url_credentials
from tests import test_pull
from tests.conftest import EXAMPLES
from tests.hubserver import FakeHub
from tests.openaiserver import FakeOpenAI
from tests.test_pull import FILE, PAYLOAD, REPO

env = test_pull.env  # the fixture: a private MALT_HOME and HF cache under tmp_path

API_KEY = "sk-PLANTEDKEY-7f3a9c"
HF_TOKEN = "hf_PLANTEDTOKEN5b2e"
EP_PASSWORD = "pw-PLANTEDEP-41d8"
HUB_PASSWORD = "pw-PLANTEDHUB-93c0"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


SECRETS = (API_KEY, HF_TOKEN, EP_PASSWORD, HUB_PASSWORD)
# The header values too: base64 of user:password is the password, only encoded.
ENCODED = tuple(_basic("user", p).split()[1] for p in (EP_PASSWORD, HUB_PASSWORD))
GSM8K = EXAMPLES / "gsm8k.jsonl"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_password(url: str, password: str) -> str:
    return url.replace("http://", f"http://user:{password}@", 1)


class _Failing(FakeOpenAI):
    """Lists its model, then answers every chat with `status`, echoing the request's
    Authorization header and the key it saw in the body, as some servers do."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        h.rfile.read(int(h.headers.get("Content-Length", 0)))
        seen = h.headers.get("Authorization", "")
        self._json(h, self.status, {"error": {"message": f"bad credentials: {seen}"}})


class Outputs:
    """Every command's stdout and stderr, kept for the final search."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []  # (which command, all it printed)

    def __call__(self, *argv: str) -> Result:
        result = CliRunner().invoke(cli, list(argv))
        label = f"#{len(self.texts)} malt {argv[0]}"  # argv itself holds the planted URLs
        self.texts.append((label, f"{result.stdout}\n{result.stderr}\n{result.exception!r}"))
        return result


def _found(blob: bytes) -> list[str]:
    needles = [*SECRETS, *ENCODED]
    return [n for n in needles if n.encode() in blob or n.encode("utf-16-le") in blob]


def test_no_secret_in_any_output_or_file(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    # A failing server is retried with backoff; the test needs the failure, not the wait.
    monkeypatch.setattr(openai_engine.OpenAIEngine, "_delay", lambda self, *a: 0.0)
    malt = Outputs()
    db = work / "malt.db"

    # -- pull, from a Hub behind Basic auth ---------------------------------------------------
    with FakeHub() as hub:
        hub.add(REPO, FILE, PAYLOAD)
        monkeypatch.setenv("HF_ENDPOINT", _with_password(hub.url, HUB_PASSWORD))
        r = malt("pull", "tiny")
        assert r.exit_code == 0, r.stderr
        assert hub.requests and all(
            q.authorization == _basic("user", HUB_PASSWORD) for q in hub.requests
        )
        assert malt("models").exit_code == 0
        hub.faults.status = 500
        r = malt("pull", "tiny:Q8_0")
        assert r.exit_code == 2, r.stderr
    monkeypatch.setenv("HF_ENDPOINT", _with_password(f"http://127.0.0.1:{_closed_port()}",
                                                     HUB_PASSWORD))  # fmt: skip
    r = malt("pull", "tiny:Q8_0")
    assert r.exit_code == 2, r.stderr

    # -- run, eval, export, status, show against a server behind Basic auth -----------------
    with FakeOpenAI() as server:
        url = _with_password(server.url, EP_PASSWORD)
        base = ["--engine", "openai", "--endpoint", url, "--model", "fake-model",
                "--max-tokens", "16", "--db", str(db)]  # fmt: skip
        r = malt("run", *base, "--n", "2", "--limit", "2", str(GSM8K))
        assert r.exit_code == 0, r.stderr
        r = malt("eval", *base, "--mode", "all", "--votes", "1", "--samples", "1",
                 "--seeds", "1", str(GSM8K))  # fmt: skip
        assert r.exit_code == 0, r.stderr
        assert server.chats
        assert {c.authorization for c in server.chats} == {_basic("user", EP_PASSWORD)}
        # The same run again: the stored settings are compared, not re-sent with the password.
        assert malt("run", *base, "--n", "2", "--limit", "2", str(GSM8K)).exit_code == 0
    assert malt("export", "--db", str(db), "--out", str(work / "export")).exit_code == 0
    assert malt("status", "--db", str(db)).exit_code == 0
    assert malt("status", "--db", str(db), "--json").exit_code == 0
    with sqlite3.connect(db) as con:
        qid = con.execute("SELECT id FROM questions LIMIT 1").fetchone()[0]
        config = "".join(row[0] for row in con.execute("SELECT config FROM runs"))
    con.close()
    assert "user" not in config and "@127.0.0.1" not in config  # no credentials kept at all
    assert malt("show", qid, "--db", str(db)).exit_code == 0
    assert malt("show", qid, "--db", str(db), "--json").exit_code == 0

    # -- the failing variants -----------------------------------------------------------------
    unreachable = _with_password(f"http://127.0.0.1:{_closed_port()}", EP_PASSWORD)
    argv = ["--engine", "openai", "--model", "fake-model", "--max-tokens", "16", "--n", "1",
            "--limit", "1", "--new-run"]  # fmt: skip
    r = malt("run", *argv, "--endpoint", unreachable, "--db", str(work / "down.db"), str(GSM8K))
    assert r.exit_code == 2
    with FakeOpenAI(api_key="sk-another-key") as refusing:  # 401 to the planted key
        r = malt("run", *argv, "--endpoint", refusing.url, "--db", str(work / "401.db"),
                 str(GSM8K))  # fmt: skip
        assert r.exit_code == 2 and "refused the API key" in r.stderr, r.stderr
    for status in (500, 400, 401):
        with _Failing(status) as failing:
            for endpoint in (failing.url, _with_password(failing.url, EP_PASSWORD)):
                r = malt("run", *argv, "--endpoint", endpoint, "--db",
                         str(work / f"fail{status}.db"), str(GSM8K))  # fmt: skip
                assert r.exit_code == 2, r.stderr
        if status == 400:
            assert "bad credentials" in r.stderr and "***" in r.stderr, r.stderr

    # -- the search ---------------------------------------------------------------------------
    leaks = []
    for label, text in malt.texts:
        if found := _found(text.encode()):
            leaks.append(f"{found} in the output of {label}: {text}")
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.endswith(".db") for p in files) and any("hf" in p.parts for p in files)
    for path in files:
        if found := _found(path.read_bytes()):
            leaks.append(f"{found} in {path.relative_to(tmp_path)}")
    assert not leaks, "\n".join(leaks)


def test_split_url_credentials() -> None:
    url, auth = split_url_credentials(f"http://user:{EP_PASSWORD}@127.0.0.1:8080/v1")
    assert url == "http://127.0.0.1:8080/v1" and auth == _basic("user", EP_PASSWORD)
    assert split_url_credentials("http://127.0.0.1:8080") == ("http://127.0.0.1:8080", None)
    # Percent-escapes in the password are what the server gets decoded.
    assert split_url_credentials("https://u:p%40ss@h/")[1] == _basic("u", "p@ss")
