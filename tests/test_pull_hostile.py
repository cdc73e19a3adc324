"""`malt pull` against a hostile Hub, a hostile spec and a cache with planted links.

Every name a pull turns into a path (the server's commit and ETag, the spec's file, --revision)
and every file it writes in the cache is checked: each case here ends with exit 2, one
``Error:`` line, and nothing outside the HF cache created or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import test_pull
from tests.hubserver import COMMIT, FakeHub
from tests.test_pull import (
    FILE,
    PAYLOAD,
    PAYLOAD_SHA,
    REPO,
    _user_models,
    cache_folder,
    malt,
    one_error_line,
)

env = test_pull.env  # the fixture: a private MALT_HOME and HF cache

SENTINEL = b"the user's own file\n"


@pytest.fixture
def hub(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    with FakeHub() as fake:
        fake.add(REPO, FILE, PAYLOAD)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        env["HF_ENDPOINT"] = fake.url
        yield fake


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the cache with a file in it, as a user's home would hold."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "sentinel.txt").write_bytes(SENTINEL)
    return folder


def _outside_cache(tmp_path: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every path under tmp_path but the HF cache, with its content (or link target)."""
    cache = tmp_path / "hf" / "hub"
    seen: dict[str, tuple[str, bytes | str]] = {}
    for root, dirs, files in os.walk(tmp_path):
        here = Path(root)
        if here == cache or cache in here.parents:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = here / name
            if path == cache:
                continue
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                seen[str(path)] = ("file", path.read_bytes())
            else:
                seen[str(path)] = ("dir", "")
    return seen


def _refused(tmp_path: Path, *args: str) -> str:
    """Run `malt pull ARGS`; assert exit 2, one line, nothing outside the cache touched."""
    before = _outside_cache(tmp_path)
    result = malt("pull", *args)
    assert result.exit_code == 2, (result.output, result.exception)
    line = one_error_line(result.stderr)
    assert _outside_cache(tmp_path) == before
    return line


@pytest.mark.parametrize(
    "commit",
    ["../../../../escape", "0123", COMMIT.upper(), COMMIT + "0"],
    ids=["climbing", "short", "uppercase", "41-hex"],
)
def test_hostile_commit_header_is_refused(
    hub: FakeHub, tmp_path: Path, outside: Path, commit: str
) -> None:
    hub.faults.commit = commit
    line = _refused(tmp_path, "tiny")
    assert "X-Repo-Commit" in line and "refused" in line
    assert hub.gets() == []


@pytest.mark.parametrize("cdn", [False, True], ids=["direct", "cdn"])
@pytest.mark.parametrize("etag", ['"."', '".."', 'W/".."', '"not-a-sha"', '"deadbeef"'], ids=str)
def test_hostile_etag_is_refused(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    outside: Path,
    etag: str,
    cdn: bool,
) -> None:
    with FakeHub(cdn=cdn) as fake:
        fake.add(REPO, FILE, PAYLOAD)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        fake.faults.etag = etag
        line = _refused(tmp_path, "tiny")
        assert "ETag" in line and "refused" in line
        assert fake.gets() == []
    assert not (cache_folder(env) / "blobs").exists()


@pytest.mark.parametrize(
    "file",
    ["../../../../../x.gguf", "sub/../../../../../../x.gguf", "sub\\x.gguf", "./x.gguf"],
    ids=["climbing", "inner-dotdot", "backslash", "dot"],
)
def test_file_part_that_leaves_the_snapshot_is_refused(
    hub: FakeHub, tmp_path: Path, outside: Path, file: str
) -> None:
    hub.add(REPO, file, PAYLOAD)  # the server would serve it: the check is malt's own
    line = _refused(tmp_path, f"{REPO}/{file}")
    assert "file name" in line and "refused" in line
    assert hub.requests == []


def test_empty_component_in_file_part_is_refused(
    hub: FakeHub, tmp_path: Path, outside: Path
) -> None:
    line = _refused(tmp_path, f"{REPO}//{FILE}")
    assert "refused" in line
    assert hub.requests == []


def test_absolute_file_in_models_toml_is_refused(
    hub: FakeHub,
    env: dict[str, str],
    tmp_path: Path,
    outside: Path,
) -> None:
    target = str(outside / "planted.gguf")
    hub.add(REPO, target, PAYLOAD)
    Path(env["MALT_HOME"], "models.toml").write_text(
        f'[models.evil]\nrepo = "{REPO}"\n[models.evil.files.Q4_K_M]\nfile = "{target}"\n',
        encoding="utf-8",
    )
    line = _refused(tmp_path, "evil")
    assert "absolute path" in line
    assert hub.requests == []


@pytest.mark.parametrize(
    "revision",
    ["../../../../escape", "-x", "/main", "a b", "v1~1", "x.lock", "main/", "a//b", "a@{1}", "a:b"],
)
def test_revision_outside_git_ref_rules_is_refused(
    hub: FakeHub, tmp_path: Path, outside: Path, revision: str
) -> None:
    hub.faults.any_revision = True  # the server would answer: the check is malt's own
    line = _refused(tmp_path, "tiny", "--revision", revision)
    assert "revision" in line and "refused" in line
    assert hub.requests == []


def test_branch_tag_and_commit_revisions_still_pull(hub: FakeHub, env: dict[str, str]) -> None:
    hub.faults.any_revision = True
    for revision in ("refs/pr/1", "v1.0", COMMIT):
        result = malt("pull", "tiny", "--revision", revision, "--quiet")
        assert result.exit_code == 0, result.output
    assert (cache_folder(env) / "refs" / "refs" / "pr" / "1").read_text() == COMMIT


def test_planted_link_at_the_partial_download_is_not_written_through(
    hub: FakeHub,
    env: dict[str, str],
    tmp_path: Path,
    outside: Path,
) -> None:
    blobs = cache_folder(env) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{PAYLOAD_SHA}.incomplete").symlink_to(outside / "sentinel.txt")
    line = _refused(tmp_path, "tiny")
    assert "symbolic link" in line
    assert (outside / "sentinel.txt").read_bytes() == SENTINEL


@pytest.mark.parametrize("where", ["snapshots", "refs", "blobs", f"snapshots/{COMMIT}"])
def test_planted_folder_link_in_the_cache_is_not_written_through(
    hub: FakeHub,
    env: dict[str, str],
    tmp_path: Path,
    outside: Path,
    where: str,
) -> None:
    link = cache_folder(env) / where
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    line = _refused(tmp_path, "tiny")
    assert "symbolic link" in line
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.txt"]


def test_planted_link_at_the_lock_file_is_not_followed(
    hub: FakeHub,
    env: dict[str, str],
    tmp_path: Path,
    outside: Path,
) -> None:
    locks = Path(env["HF_HUB_CACHE"]) / ".locks" / cache_folder(env).name
    locks.mkdir(parents=True)
    (locks / f"{PAYLOAD_SHA}.lock").symlink_to(outside / "created-by-malt")
    line = _refused(tmp_path, "tiny")
    assert "symbolic link" in line
    assert not (outside / "created-by-malt").exists()


def test_corrupt_snapshot_link_deletes_only_the_link_not_its_target(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    outside: Path,
) -> None:
    """Offline, a snapshot whose content mismatches is removed; a link out of the cache is
    removed as a link, and the file it points at stays."""
    _user_models(Path(env["MALT_HOME"]), sha256=PAYLOAD_SHA)
    folder = cache_folder(env)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    (folder / "snapshots" / COMMIT / FILE).symlink_to(outside / "sentinel.txt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _refused(tmp_path, "tiny")
    assert "corrupt" in line
    assert (outside / "sentinel.txt").read_bytes() == SENTINEL
