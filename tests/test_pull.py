"""`malt pull`, `malt models` and `resolve_model`, against a fake Hub on 127.0.0.1.

Nothing here reaches the internet: HF_ENDPOINT points at tests/hubserver.py, and the tests that
must behave like a user retyping a command after a crash run `python -m malt_local` twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.errors import EXIT_DISK_FULL, MaltError
from malt_local.models import download
from malt_local.models.catalog import load_catalog
from malt_local.models.hf_cache import HubConfig
from malt_local.models.records import load_records, records_path
from malt_local.models.resolve import resolve_model
from malt_local.models.spec import parse_spec
from tests.conftest import default_signals
from tests.hubserver import COMMIT, FakeHub
from tests.smallfs import leave_free, small_filesystem

ROOT = Path(__file__).resolve().parent.parent
REPO = "tester/Tiny-GGUF"
FILE = "tiny-Q4_K_M.gguf"
OTHER = "tiny-Q8_0.gguf"
CUT = 100_000


def _gguf(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"GGUF" + struct.pack("<I", 3) + rng.randbytes(size - 8)


PAYLOAD = _gguf(300_000, 1)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
OTHER_PAYLOAD = _gguf(200_000, 2)


def _user_models(home: Path, sha256: str = "", extra: str = "") -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(
        f"""
[models.tiny]
repo = "{REPO}"
default_quant = "Q4_K_M"
chat_template = "chatml"
context_length = 2048
licence = "Test Licence"
licence_notice = "Built with Tiny."

[models.tiny.files.Q4_K_M]
file = "{FILE}"
size = {len(PAYLOAD)}
sha256 = "{sha256}"

[models.tiny.files.Q8_0]
file = "{OTHER}"
{extra}
""",
        encoding="utf-8",
    )


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Private MALT_HOME and HF cache; the same variables go to subprocesses."""
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
        "HF_TOKEN_PATH",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
    ):
        monkeypatch.delenv(name, raising=False)
    values = {
        "MALT_HOME": str(tmp_path / "malt"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "MALT_PULL_RETRIES": "0",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    _user_models(Path(values["MALT_HOME"]))
    return values


@pytest.fixture
def hub(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    with FakeHub() as fake:
        fake.add(REPO, FILE, PAYLOAD)
        fake.add(REPO, OTHER, OTHER_PAYLOAD)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        env["HF_ENDPOINT"] = fake.url
        yield fake


def malt(*args: str):
    return CliRunner().invoke(cli, list(args))


def malt_process(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess:
    """A separate `python -m malt_local` process, as after Ctrl-C or a reboot."""
    full = {**os.environ, **env, **extra, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "malt_local", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )


def cache_folder(env: dict[str, str]) -> Path:
    return Path(env["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--"))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


# --------------------------------------------------------------------------- catalog


def test_shipped_catalog_has_llama_and_smollm(tmp_path: Path) -> None:
    catalog = load_catalog(tmp_path)
    llama = catalog["llama3.1-8b"]
    assert llama.repo == "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"
    assert llama.default_quant == "Q4_K_M"
    q4 = llama.files["Q4_K_M"]
    assert q4.file == "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"
    assert q4.size == 4920734016 and q4.sha256 is None
    assert llama.files["Q8_0"].file == "Meta-Llama-3.1-8B-Instruct-Q8_0.gguf"
    assert llama.licence == "Llama 3.1 Community License"
    assert "Built with Llama" in (llama.licence_notice or "")
    assert "Llama 3.1 is licensed under the Llama 3.1 Community License" in (
        llama.licence_notice or ""
    )
    assert llama.chat_template == "llama3" and llama.context_length == 131072
    smol = catalog["smollm2-135m"]
    assert smol.default_quant == "Q4_1"
    q41 = smol.files["Q4_1"]
    assert q41.size == 98362432
    assert q41.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smol.chat_template == "chatml"


def test_user_catalog_extends_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text(
        """
[models."llama3.1-8b"]
default_quant = "Q8_0"
[models."llama3.1-8b".files.Q8_0]
sha256 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
[models."llama3.1-8b".files.IQ2_M]
file = "Meta-Llama-3.1-8B-Instruct-IQ2_M.gguf"
[models.mine]
repo = "me/mine-GGUF"
[models.mine.files.F16]
file = "mine-f16.gguf"
""",
        encoding="utf-8",
    )
    catalog = load_catalog(tmp_path)
    llama = catalog["llama3.1-8b"]
    assert llama.default_quant == "Q8_0"
    assert llama.files["Q8_0"].sha256 == "a" * 64  # merged per field, normalised
    assert llama.files["Q8_0"].file == "Meta-Llama-3.1-8B-Instruct-Q8_0.gguf"
    assert "IQ2_M" in llama.files and "Q4_K_M" in llama.files
    assert llama.repo == "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"
    assert catalog["mine"].default_quant == "F16"
    spec = parse_spec("Mine", catalog)
    assert (spec.repo, spec.file, spec.revision) == ("me/mine-GGUF", "mine-f16.gguf", "main")


def test_bad_user_catalog_is_one_line(env: dict[str, str]) -> None:
    Path(env["MALT_HOME"], "models.toml").write_text("[models.x\nrepo=", encoding="utf-8")
    result = malt("pull", "x")
    assert result.exit_code == 2
    assert "not valid TOML" in one_error_line(result.stderr)


def test_spec_forms(env: dict[str, str]) -> None:
    catalog = load_catalog()
    s = parse_spec("tiny:q8_0", catalog)
    assert (s.alias, s.quant, s.file) == ("tiny", "Q8_0", OTHER)
    s = parse_spec(f"{REPO}/{FILE}", catalog)
    assert (s.alias, s.quant) == ("tiny", "Q4_K_M")  # a Hub path of an alias keeps its pin
    s = parse_spec(f"https://huggingface.co/{REPO}/resolve/{COMMIT}/sub/x.gguf", catalog)
    assert (s.repo, s.file, s.revision, s.alias) == (REPO, "sub/x.gguf", COMMIT, None)
    with pytest.raises(MaltError, match="names a repository"):
        parse_spec(REPO, catalog)
    with pytest.raises(MaltError, match="unknown quantisation 'Q2' .*known: Q4_K_M, Q8_0"):
        parse_spec("tiny:Q2", catalog)


# --------------------------------------------------------------------------- downloads


def test_plain_download_into_hf_cache_layout(hub: FakeHub, env: dict[str, str]) -> None:
    result = malt("pull", "tiny")
    assert result.exit_code == 0, result.stderr
    folder = cache_folder(env)
    snapshot = folder / "snapshots" / COMMIT / FILE
    assert result.stdout.strip() == str(snapshot)
    assert snapshot.is_symlink()
    assert os.readlink(snapshot) == f"../../blobs/{PAYLOAD_SHA}"
    assert snapshot.read_bytes() == PAYLOAD
    assert (folder / "refs" / "main").read_text() == COMMIT
    assert not list((folder / "blobs").glob("*.incomplete"))
    record = load_records()[f"{REPO}/{FILE}"]
    assert record.sha256 == PAYLOAD_SHA
    assert record.verified_against == "hub-etag"
    assert (record.alias, record.quant, record.commit) == ("tiny", "Q4_K_M", COMMIT)
    assert [r.method for r in hub.requests] == ["HEAD", "GET"]
    assert hub.gets()[0].range is None
    assert "verified against the Hub's ETag" in result.stderr
    assert "licence: Built with Tiny." in result.stderr


def test_pull_by_hub_path_and_json(hub: FakeHub, env: dict[str, str]) -> None:
    hub.add("other/Repo", "dir/m.gguf", OTHER_PAYLOAD)
    result = malt("pull", "other/Repo/dir/m.gguf", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sha256"] == hashlib.sha256(OTHER_PAYLOAD).hexdigest()
    assert data["alias"] is None and data["action"] == "downloaded"
    assert data["path"].endswith(f"snapshots/{COMMIT}/dir/m.gguf")
    assert os.readlink(data["path"]).startswith("../../../blobs/")
    assert Path(data["path"]).read_bytes() == OTHER_PAYLOAD
    assert result.stderr == ""


def test_cut_connection_resumes_in_a_new_process(hub: FakeHub, env: dict[str, str]) -> None:
    hub.faults.cut_after = CUT
    first = malt_process(env, "pull", "tiny")
    assert first.returncode == 2, first.stderr
    line = one_error_line(first.stderr.splitlines()[-1])
    assert "again to resume" in line and "malt pull tiny" in line
    partial = cache_folder(env) / "blobs" / f"{PAYLOAD_SHA}.incomplete"
    assert partial.stat().st_size == CUT
    assert f"{REPO}/{FILE}" not in load_records()

    hub.faults.cut_after = None
    hub.clear()
    second = malt_process(env, "pull", "tiny", "--json")
    assert second.returncode == 0, second.stderr
    assert [g.range for g in hub.gets()] == [f"bytes={CUT}-"]
    data = json.loads(second.stdout)
    assert data["action"] == "resumed" and data["resumed_from"] == CUT
    assert data["bytes_transferred"] == len(PAYLOAD) - CUT
    assert hashlib.sha256(Path(data["path"]).read_bytes()).hexdigest() == PAYLOAD_SHA
    assert data["sha256"] == PAYLOAD_SHA
    assert not partial.exists()


def _pull_stalled_at_cut(
    hub: FakeHub, env: dict[str, str], **popen: object
) -> tuple[subprocess.Popen, Path]:
    """`malt pull tiny` in its own process, once it has written the first CUT bytes and the
    Hub holds the rest back; also the partial file's path."""
    hub.faults.stall_after = CUT
    partial = cache_folder(env) / "blobs" / f"{PAYLOAD_SHA}.incomplete"
    proc = subprocess.Popen(
        [sys.executable, "-m", "malt_local", "pull", "tiny"],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        **popen,  # type: ignore[call-overload]
    )
    try:
        assert hub.stalled.wait(20)
        deadline = time.monotonic() + 20
        while not (partial.exists() and partial.stat().st_size == CUT):
            assert time.monotonic() < deadline, "the client never wrote the first bytes"
            time.sleep(0.01)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, partial


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill"]
)
def test_killed_pull_resumes_in_a_new_process(
    hub: FakeHub, env: dict[str, str], sig: signal.Signals
) -> None:
    proc, partial = _pull_stalled_at_cut(hub, env, preexec_fn=default_signals)
    try:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig != signal.SIGKILL:
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
        assert "run `malt pull tiny` again to resume" in stderr and "Traceback" not in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert partial.stat().st_size == CUT

    hub.faults.stall_after = None
    hub.release.set()
    hub.clear()
    again = malt_process(env, "pull", "tiny")
    assert again.returncode == 0, again.stderr
    assert [g.range for g in hub.gets()] == [f"bytes={CUT}-"]
    assert Path(again.stdout.strip()).read_bytes() == PAYLOAD


def test_disk_filling_during_pull_is_one_line_and_the_pull_resumes(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    """Another program fills the disk mid-download: exit 75 with one line, the partial kept."""
    with small_filesystem(Path(env["HF_HUB_CACHE"]), size="1m") as fs:
        proc, partial = _pull_stalled_at_cut(hub, env)
        try:
            filler = leave_free(fs, 64 * 1024)  # less than the 200 kB still to come
            hub.release.set()
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == EXIT_DISK_FULL, stderr
        line = one_error_line(stderr.splitlines()[-1])
        assert line.startswith(f"Error: disk full writing {partial} (")
        assert "run the same command again" in line and len(stderr.strip().splitlines()) <= 2
        kept = partial.read_bytes()
        assert CUT < len(kept) < len(PAYLOAD) and PAYLOAD.startswith(kept)

        filler.unlink()
        hub.faults.stall_after = None
        hub.clear()
        again = malt_process(env, "pull", "tiny")
        assert again.returncode == 0, again.stderr
        assert [g.range for g in hub.gets()] == [f"bytes={len(kept)}-"]
        assert Path(again.stdout.strip()).read_bytes() == PAYLOAD


def test_dropped_connection_retries_in_process(hub: FakeHub, env: dict[str, str]) -> None:
    hub.faults.cut_after, hub.faults.cut_count = CUT, 2
    cfg = HubConfig.from_env()
    cfg = HubConfig(**{**cfg.__dict__, "retries": 3, "retry_wait": 0.0})
    result = download.pull(parse_spec("tiny"), cfg)
    assert result.record.sha256 == PAYLOAD_SHA
    assert [g.range for g in hub.gets()] == [None, f"bytes={CUT}-", f"bytes={2 * CUT}-"]
    assert len(hub.heads()) == 3  # a fresh HEAD before each retry: CDN URLs expire


def test_server_ignoring_range_restarts_from_zero(hub: FakeHub, env: dict[str, str]) -> None:
    hub.faults.cut_after = CUT
    assert malt("pull", "tiny").exit_code == 2
    hub.faults.cut_after, hub.faults.ignore_range = None, True
    hub.clear()
    result = malt("pull", "tiny")
    assert result.exit_code == 0, result.stderr
    assert [g.range for g in hub.gets()] == [f"bytes={CUT}-"]
    assert "ignored the resume request" in result.stderr
    assert Path(result.stdout.strip()).read_bytes() == PAYLOAD


@pytest.mark.parametrize("pinned", [False, True], ids=["etag", "models.toml"])
def test_corrupted_byte_is_caught_and_removed(
    hub: FakeHub, env: dict[str, str], pinned: bool
) -> None:
    if pinned:
        _user_models(Path(env["MALT_HOME"]), sha256=PAYLOAD_SHA)
    hub.faults.flip_byte_at = 12_345
    result = malt("pull", "tiny")
    assert result.exit_code == 2
    line = one_error_line(result.stderr.splitlines()[-1])
    assert "sha256 mismatch" in line and f"expected {PAYLOAD_SHA}" in line and "deleted" in line
    folder = cache_folder(env)
    assert list((folder / "blobs").iterdir()) == []
    assert not (folder / "snapshots").exists()
    assert f"{REPO}/{FILE}" not in load_records()

    hub.faults.flip_byte_at = None
    result = malt("pull", "tiny")
    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == PAYLOAD
    expected = "models.toml" if pinned else "hub-etag"
    assert load_records()[f"{REPO}/{FILE}"].verified_against == expected


def test_corrupt_partial_left_by_a_crash_is_caught(hub: FakeHub, env: dict[str, str]) -> None:
    blobs = cache_folder(env) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{PAYLOAD_SHA}.incomplete").write_bytes(b"\0" * CUT)  # a reboot's zero fill
    result = malt("pull", "tiny")
    assert result.exit_code == 2 and "sha256 mismatch" in result.stderr
    assert list(blobs.iterdir()) == []
    assert malt("pull", "tiny").exit_code == 0


def test_interrupt_keeps_the_partial(hub: FakeHub, env: dict[str, str]) -> None:
    class CtrlC(download.NullProgress):
        def advance(self, n: int) -> None:
            raise KeyboardInterrupt

    with pytest.raises(download.PullInterrupted) as info:
        download.pull(parse_spec("tiny"), progress=CtrlC())
    have = info.value.have
    assert 0 < have < len(PAYLOAD) and info.value.partial.stat().st_size == have
    hub.clear()
    result = malt("pull", "tiny")
    assert result.exit_code == 0, result.stderr
    assert [g.range for g in hub.gets()] == [f"bytes={have}-"]
    assert Path(result.stdout.strip()).read_bytes() == PAYLOAD


def test_complete_partial_is_verified_without_get(hub: FakeHub, env: dict[str, str]) -> None:
    """Killed after the last byte but before the rename: nothing left to fetch."""
    blobs = cache_folder(env) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{PAYLOAD_SHA}.incomplete").write_bytes(PAYLOAD)
    result = malt("pull", "tiny")
    assert result.exit_code == 0, result.stderr
    assert hub.gets() == []
    assert Path(result.stdout.strip()).read_bytes() == PAYLOAD


def test_pinned_sha_that_the_hub_contradicts_fails_before_get(
    hub: FakeHub, env: dict[str, str]
) -> None:
    _user_models(Path(env["MALT_HOME"]), sha256="b" * 64)
    result = malt("pull", "tiny")
    assert result.exit_code == 2
    assert "changed upstream" in one_error_line(result.stderr)
    assert hub.gets() == []


def test_repull_of_verified_file_transfers_nothing(hub: FakeHub, env: dict[str, str]) -> None:
    first = malt("pull", "tiny")
    assert first.exit_code == 0
    hub.clear()
    again = malt("pull", "tiny")
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert hub.gets() == [] and len(hub.heads()) == 1  # unpinned: one HEAD asks "still same?"
    assert "already pulled" in again.stderr

    _user_models(Path(env["MALT_HOME"]), sha256=PAYLOAD_SHA)
    hub.clear()
    assert malt("pull", "tiny").exit_code == 0
    assert hub.requests == []  # pinned and unchanged: no network at all


def test_blob_already_in_cache_is_reused(hub: FakeHub, env: dict[str, str]) -> None:
    """A file fetched by `hf download` or llama.cpp -hf (same cache) is verified, not fetched."""
    assert malt("pull", "tiny").exit_code == 0
    records_path().unlink()
    hub.clear()
    result = malt("pull", "tiny")
    assert result.exit_code == 0
    assert hub.gets() == []
    assert load_records()[f"{REPO}/{FILE}"].sha256 == PAYLOAD_SHA


def test_cdn_redirect_drops_the_token(env: dict[str, str], monkeypatch) -> None:
    with FakeHub(cdn=True) as fake:
        fake.add(REPO, FILE, PAYLOAD)
        fake.faults.token = "hf_secret"
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        result = malt("pull", "tiny")
        assert result.exit_code == 0, result.stderr
        head, get = fake.requests
        assert head.method == "HEAD" and head.authorization == "Bearer hf_secret"
        assert get.method == "GET" and get.host.startswith("localhost:")
        assert get.authorization is None
    assert Path(result.stdout.strip()).read_bytes() == PAYLOAD
    assert load_records()[f"{REPO}/{FILE}"].verified_against == "hub-etag"


def test_not_enough_disk_space(hub: FakeHub, env: dict[str, str], monkeypatch) -> None:
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    result = malt("pull", "tiny")
    assert result.exit_code == 2
    line = one_error_line(result.stderr.splitlines()[-1])
    assert "not enough disk space" in line and "HF_HUB_CACHE" in line
    assert hub.gets() == []


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "setup", "message"),
    [
        (["nobody/none/x.gguf"], None, "repository 'nobody/none' not found on the Hub"),
        ([f"{REPO}/missing.gguf"], None, f"file 'missing.gguf' not found in {REPO}"),
        (["tiny", "--revision", "v9"], None, f"revision 'v9' not found in {REPO}"),
        (["tiny"], "gated", f"{REPO} is a gated repository"),
        (["tiny"], "bad-token", "the Hub refused the token"),
        (["tiny"], "private", f"repository '{REPO}' not found on the Hub"),
    ],
)
def test_hub_errors_are_one_line(
    hub: FakeHub, monkeypatch, args: list[str], setup: str | None, message: str
) -> None:
    if setup == "gated":
        hub.faults.gated.add(REPO)
    elif setup in ("bad-token", "private"):
        hub.faults.token = "hf_right"
        if setup == "bad-token":
            monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    result = malt("pull", *args)
    assert result.exit_code == 2
    assert message in one_error_line(result.stderr)
    assert hub.gets() == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_not_there_suggests_file(env: dict[str, str]) -> None:
    result = malt_process(env, "pull", "tiny", HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "cannot reach the Hugging Face Hub" in line and "--file PATH" in line


def test_unknown_alias_suggests_close_name(env: dict[str, str]) -> None:
    result = malt("pull", "tinny")
    assert result.exit_code == 2
    assert "did you mean 'tiny'?" in one_error_line(result.stderr)
    result = malt("pull", "llama-3.1-8b")
    assert "did you mean 'llama3.1-8b'" in one_error_line(result.stderr)


# --------------------------------------------------------------------------- offline


def test_offline_after_pull_uses_no_network(hub: FakeHub, env: dict[str, str]) -> None:
    assert malt_process(env, "pull", "tiny").returncode == 0
    hub.clear()
    offline = malt_process(env, "pull", "tiny", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip()).read_bytes() == PAYLOAD
    # Without malt's record, the HF cache alone serves (as for `hf download`'s files).
    records_path().unlink()
    offline = malt_process(env, "pull", "tiny", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert hub.requests == []
    missing = malt_process(env, "pull", "tiny:Q8_0", HF_HUB_OFFLINE="1")
    assert missing.returncode == 2
    line = one_error_line(missing.stderr)
    assert "HF_HUB_OFFLINE" in line and "--file PATH" in line
    assert hub.requests == []


def test_unreachable_hub_falls_back_to_the_verified_copy(
    hub: FakeHub, env: dict[str, str], monkeypatch
) -> None:
    assert malt("pull", "tiny").exit_code == 0
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    result = malt("pull", "tiny")
    assert result.exit_code == 0
    assert "cannot reach the Hub" in result.stderr


# --------------------------------------------------------------------------- --file


def test_file_import_checks_gguf_and_sha(tmp_path: Path, env: dict[str, str]) -> None:
    _user_models(Path(env["MALT_HOME"]), sha256=PAYLOAD_SHA)
    good = tmp_path / "usb" / "tiny.gguf"
    good.parent.mkdir()
    good.write_bytes(PAYLOAD)
    result = malt("pull", "tiny", "--file", str(good))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(good.resolve())
    record = load_records()[f"{REPO}/{FILE}"]
    assert (record.source, record.verified_against) == ("file", "models.toml")
    assert "verified against models.toml" in result.stderr

    wrong = tmp_path / "usb" / "wrong.gguf"
    wrong.write_bytes(PAYLOAD[:-1] + b"x")
    result = malt("pull", "tiny", "--file", str(wrong))
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "sha256 mismatch" in line and "--trust" in line
    assert load_records()[f"{REPO}/{FILE}"].path == str(good.resolve())

    result = malt("pull", "tiny", "--file", str(wrong), "--trust")
    assert result.exit_code == 0, result.stderr
    assert load_records()[f"{REPO}/{FILE}"].verified_against == "trusted"

    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    result = malt("pull", "tiny", "--file", str(text))
    assert result.exit_code == 2
    assert "is not a GGUF file" in one_error_line(result.stderr)

    result = malt("pull", "tiny", "--file", str(tmp_path / "absent.gguf"))
    assert result.exit_code == 2
    one_error_line(result.stderr)


def test_file_import_without_pin_is_recorded_unverified(tmp_path: Path, env) -> None:
    path = tmp_path / "q8.gguf"
    path.write_bytes(OTHER_PAYLOAD)
    result = malt("pull", "tiny:Q8_0", "--file", str(path))
    assert result.exit_code == 0, result.stderr
    assert "pins no sha256" in result.stderr
    resolved = resolve_model("tiny:Q8_0")
    assert resolved.path == path.resolve()
    assert resolved.sha256 == hashlib.sha256(OTHER_PAYLOAD).hexdigest()


def test_trust_needs_file(env: dict[str, str]) -> None:
    result = malt("pull", "tiny", "--trust")
    assert result.exit_code == 2


# --------------------------------------------------------------------------- models, resolve


def test_models_lists_pulled_and_not(hub: FakeHub, env: dict[str, str]) -> None:
    assert malt("pull", "tiny").exit_code == 0
    result = malt("models", "--json")
    assert result.exit_code == 0
    rows = {(r["alias"], r["quant"]): r for r in json.loads(result.stdout)}
    pulled = rows[("tiny", "Q4_K_M")]
    assert pulled["pulled"] and pulled["default"] and pulled["sha256"] == PAYLOAD_SHA
    assert pulled["size"] == len(PAYLOAD) and pulled["path"].endswith(FILE)
    assert not rows[("tiny", "Q8_0")]["pulled"]
    assert not rows[("llama3.1-8b", "Q4_K_M")]["pulled"]
    assert rows[("smollm2-135m", "Q4_1")]["size"] == 98362432
    table = malt("models")
    assert table.exit_code == 0
    assert "tiny" in table.stdout and "llama3.1-8b" in table.stdout


def test_resolve_model(hub: FakeHub, env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(MaltError) as info:
        resolve_model("tiny")
    assert str(info.value.message) == (
        "model 'tiny' is not pulled: run `malt pull tiny` "
        "(or `malt pull tiny --file PATH` on an air-gapped machine)"
    )
    with pytest.raises(MaltError, match="did you mean 'tiny'"):
        resolve_model("tiyn")
    with pytest.raises(MaltError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))

    pulled = Path(malt("pull", "tiny").stdout.strip())
    resolved = resolve_model("tiny")
    assert resolved.path == pulled and resolved.sha256 == PAYLOAD_SHA
    assert resolved.alias == "tiny" and resolved.licence_notice == "Built with Tiny."
    assert resolved.chat_template == "chatml" and resolved.context_length == 2048
    assert resolve_model("tiny:Q4_K_M").path == pulled
    assert resolve_model(f"{REPO}/{FILE}").path == pulled
    with pytest.raises(MaltError, match="'tiny:Q8_0' is not pulled"):
        resolve_model("tiny:Q8_0")

    loose = tmp_path / "loose.gguf"
    loose.write_bytes(OTHER_PAYLOAD)
    direct = resolve_model(str(loose))
    assert direct.path == loose and direct.sha256 is None and direct.alias is None
    assert resolve_model(str(pulled)).sha256 == PAYLOAD_SHA  # a recorded path keeps its sha

    pulled.resolve().unlink()  # the blob vanished (cache cleaned by hand)
    with pytest.raises(MaltError, match="is gone; run `malt pull tiny"):
        resolve_model("tiny")


def test_licence_notice_for() -> None:
    from malt_local.models.catalog import licence_notice_for

    assert "Built with Llama" in (licence_notice_for("llama3.1-8b") or "")
    assert licence_notice_for("llama3.1-8b:Q8_0") == licence_notice_for("llama3.1-8b")
    assert licence_notice_for("no-such-model") is None


def test_alias_pinned_to_a_commit(hub: FakeHub, env: dict[str, str]) -> None:
    """Like smollm2-135m in models.toml: revision = a commit, sha256 pinned."""
    _user_models(
        Path(env["MALT_HOME"]),
        sha256=PAYLOAD_SHA,
        extra=f'[models.pinned]\nrepo = "{REPO}"\nrevision = "{COMMIT}"\n'
        f'[models.pinned.files.Q4_K_M]\nfile = "{FILE}"\nsha256 = "{PAYLOAD_SHA}"\n',
    )
    result = malt("pull", "pinned")
    assert result.exit_code == 0, result.stderr
    assert hub.heads()[0].path == f"/{REPO}/resolve/{COMMIT}/{FILE}"
    assert not (cache_folder(env) / "refs").exists()  # a commit needs no ref
    records_path().unlink()
    hub.clear()
    offline = malt_process(env, "pull", "pinned", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert hub.requests == []
    assert load_records()[f"{REPO}/{FILE}"].verified_against == "models.toml"


def _record(**changes: object) -> dict:
    good = {"repo": REPO, "file": FILE, "path": "/models/tiny.gguf", "sha256": PAYLOAD_SHA,
            "size": len(PAYLOAD), "verified_against": "hub-etag", "source": "hub"}  # fmt: skip
    good.update(changes)
    return {k: v for k, v in good.items() if v is not ...}


BAD_RECORDS = {
    "a list": [{"records": {}}],
    "a string": "records",
    "a number": 1,
    "records a list": {"version": 1, "records": [_record()]},
    "a record a string": {"version": 1, "records": {f"{REPO}/{FILE}": "tiny.gguf"}},
    "a record without its path": {"records": {f"{REPO}/{FILE}": _record(path=...)}},
    "a record without its sha256": {"records": {f"{REPO}/{FILE}": _record(sha256=...)}},
    "a size that is a string": {"records": {f"{REPO}/{FILE}": _record(size="12")}},
    "a size that is a bool": {"records": {f"{REPO}/{FILE}": _record(size=True)}},
    "a path that is a number": {"records": {f"{REPO}/{FILE}": _record(path=7)}},
    "an mtime that is a string": {"records": {f"{REPO}/{FILE}": _record(mtime_ns="1")}},
}


@pytest.mark.parametrize("content", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_pulled_json_of_the_wrong_shape_is_one_line_naming_it(
    hub: FakeHub, env: dict[str, str], tmp_path: Path, content: object
) -> None:
    path = records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    before = path.read_bytes()
    db = tmp_path / "m.db"
    questions = Path(__file__).parent.parent / "examples" / "gsm8k.jsonl"
    for argv in (
        ["models"],
        ["models", "--json"],
        ["run", "--model", "tiny", "--db", str(db), str(questions)],
        ["pull", "tiny"],
    ):
        result = malt(*argv)
        assert result.exit_code == 2, (argv, result.output, result.exception)
        line = one_error_line(result.stderr)
        assert line.startswith(f"Error: the model records {path} are not malt's ("), argv
        assert line.endswith("move the file away and pull again")
    assert path.read_bytes() == before  # not rewritten over by the pull
    assert not db.exists() and not cache_folder(env).exists()
