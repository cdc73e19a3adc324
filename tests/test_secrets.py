"""No secret in any output: API keys, HF_TOKEN and URL passwords never reach stdout or stderr.

Distinctive secrets are planted in the environment and in the endpoint URLs; every command here
fails (or succeeds) and its whole output is searched for them.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.errors import MaltError, clean_secret, redact
from tests import test_pull
from tests.conftest import EXAMPLES
from tests.hubserver import FakeHub
from tests.openaiserver import FakeOpenAI
from tests.test_pull import FILE, PAYLOAD, REPO, one_error_line

env = test_pull.env  # the fixture: a private MALT_HOME and HF cache

API_KEY = "sk-SECRETXYZ123"
PASSWORD = "pw-SECRET987"
HF_TOKEN = "hf_SECRETTOKEN42"
SECRETS = (API_KEY, PASSWORD, HF_TOKEN, "SECRET")


def _closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_no_secret(result) -> None:  # type: ignore[no-untyped-def]
    text = result.output + result.stderr + repr(result.exception or "")
    for secret in SECRETS:
        assert secret not in text, text


def _run(db: Path, url: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    questions = str(EXAMPLES / "gsm8k.jsonl")
    argv = ["run", "--engine", "openai", "--endpoint", url, "--model", "fake-model", "--n", "2",
            "--max-tokens", "16", "--db", str(db), "--json", questions]  # fmt: skip
    return CliRunner().invoke(cli, argv, env=env)


# -- the pieces ----------------------------------------------------------------------------------


def test_redact_hides_url_passwords_only() -> None:
    assert redact(f"endpoint http://user:{PASSWORD}@127.0.0.1:1 is down") == (
        "endpoint http://user:***@127.0.0.1:1 is down"
    )
    assert redact("http://127.0.0.1:8080/v1 and http://user@host") == (
        "http://127.0.0.1:8080/v1 and http://user@host"
    )
    assert PASSWORD not in MaltError(f"at https://u:{PASSWORD}@h/x").format_message()


def test_clean_secret_strips_and_refuses_control_characters() -> None:
    assert clean_secret(f"  {API_KEY}\n", "$OPENAI_API_KEY") == API_KEY
    assert clean_secret(" \n", "$OPENAI_API_KEY") is None
    with pytest.raises(MaltError) as info:
        clean_secret(f"{API_KEY}\nsecond-line", "$OPENAI_API_KEY")
    assert "$OPENAI_API_KEY" in info.value.message and API_KEY not in info.value.message


# -- --engine openai -----------------------------------------------------------------------------


def test_endpoint_password_is_redacted_when_unreachable(tmp_path: Path) -> None:
    url = f"http://user:{PASSWORD}@127.0.0.1:{_closed_port()}"
    r = _run(tmp_path / "r.db", url, {"OPENAI_API_KEY": API_KEY})
    assert r.exit_code == 2, r.output
    line = one_error_line(r.stderr)
    # The credentials left the URL when it was read (they go as Basic auth): the message names
    # the bare endpoint.
    assert "not reachable" in line and "http://127.0.0.1:" in line and "user" not in line
    _assert_no_secret(r)
    assert not (tmp_path / "r.db").exists()


def test_api_key_with_a_newline_is_refused_without_printing_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    r = _run(tmp_path / "r.db", url, {"OPENAI_API_KEY": f"{API_KEY}\nsk-SECRETSECOND"})
    assert r.exit_code == 2, r.output
    line = one_error_line(r.stderr)
    assert "$OPENAI_API_KEY" in line and "control character" in line
    _assert_no_secret(r)


def test_api_key_is_stripped_before_it_is_sent(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=API_KEY) as server:
        r = _run(tmp_path / "r.db", server.url, {"OPENAI_API_KEY": f"  {API_KEY}\n"})
    assert r.exit_code == 0, r.output
    _assert_no_secret(r)


# -- malt pull -----------------------------------------------------------------------------------


def test_hub_endpoint_password_is_redacted_when_unreachable(env: dict[str, str]) -> None:
    url = f"http://user:{PASSWORD}@127.0.0.1:{_closed_port()}"
    r = CliRunner().invoke(cli, ["pull", "tiny"], env={"HF_ENDPOINT": url, "HF_TOKEN": HF_TOKEN})
    assert r.exit_code == 2, r.output
    line = one_error_line(r.stderr)
    assert "cannot reach" in line and "http://127.0.0.1:" in line and "user" not in line
    _assert_no_secret(r)


def test_hf_token_with_a_newline_is_refused_without_printing_it(env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    r = CliRunner().invoke(
        cli, ["pull", "tiny"], env={"HF_ENDPOINT": url, "HF_TOKEN": f"{HF_TOKEN}\nhf_other"}
    )
    assert r.exit_code == 2, r.output
    line = one_error_line(r.stderr)
    assert "HF_TOKEN" in line and "control character" in line
    _assert_no_secret(r)


def test_hf_token_is_stripped_before_it_is_sent(env: dict[str, str]) -> None:
    with FakeHub() as hub:
        hub.add(REPO, FILE, PAYLOAD)
        hub.faults.token = HF_TOKEN
        r = CliRunner().invoke(
            cli, ["pull", "tiny"], env={"HF_ENDPOINT": hub.url, "HF_TOKEN": f" {HF_TOKEN}\n"}
        )
    assert r.exit_code == 0, r.output
    _assert_no_secret(r)
