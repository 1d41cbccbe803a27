"""Reading desired state from real Git repositories (file://) and local paths; the fleet lock."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from reconciler.lock import LockTimeout, fleet_lock
from reconciler.source import GitSource, LocalSource, SourceError

pytestmark = pytest.mark.integration


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


@pytest.fixture
def remote(tmp_path: Path) -> tuple[Path, Path]:
    """A bare repository and a work clone of it with one commit on main."""
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(bare), str(work))
    git(work, "checkout", "-q", "-b", "main")
    (work / "fleet").mkdir()
    (work / "fleet" / "a.yaml").write_text("a: 1\n")
    (work / "fleet" / "nested").mkdir()
    (work / "fleet" / "nested" / "b.yml").write_text("b: 2\n")
    (work / "fleet" / "notes.txt").write_text("not a manifest")
    (work / "modules").mkdir()
    (work / "modules" / "m.wasm").write_bytes(b"\0asm-v1")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "one")
    git(work, "push", "-q", "origin", "main")
    return bare, work


def test_reads_manifests_under_path_at_the_commit(
    remote: tuple[Path, Path], tmp_path: Path
) -> None:
    bare, work = remote
    first = git(work, "rev-parse", "HEAD")
    source = GitSource(f"file://{bare}", "main", "fleet", cache_dir=tmp_path / "cache")
    revision = source.fetch()
    assert revision.id == first
    assert dict(revision.files) == {"fleet/a.yaml": b"a: 1\n", "fleet/nested/b.yml": b"b: 2\n"}
    assert revision.read("modules/m.wasm") == b"\0asm-v1"
    assert revision.read("modules/missing.wasm") is None
    assert revision.read("../outside") is None

    # A new commit changes the module; the old revision still reads the old bytes.
    (work / "modules" / "m.wasm").write_bytes(b"\0asm-v2")
    git(work, "commit", "-q", "-am", "two")
    git(work, "tag", "v2")
    git(work, "push", "-q", "origin", "main", "--tags")
    second = source.fetch()
    assert second.id == git(work, "rev-parse", "HEAD") != first
    assert second.read("modules/m.wasm") == b"\0asm-v2"
    assert revision.read("modules/m.wasm") == b"\0asm-v1"

    by_tag = GitSource(f"file://{bare}", "v2", "fleet", cache_dir=tmp_path / "cache").fetch()
    assert by_tag.id == second.id
    by_sha = GitSource(f"file://{bare}", first, ".", cache_dir=tmp_path / "cache").fetch()
    assert by_sha.id == first and "fleet/a.yaml" in by_sha.files


@pytest.mark.parametrize(
    ("ref", "path", "message"),
    [
        ("nope", "fleet", "cannot fetch 'nope'"),
        ("main", "missing", "path 'missing' does not exist"),
        ("main", "fleet/a.yaml", "is not a directory"),
    ],
)
def test_bad_refs_and_paths_are_reported(
    remote: tuple[Path, Path], tmp_path: Path, ref: str, path: str, message: str
) -> None:
    bare, _work = remote
    with pytest.raises(SourceError, match=message):
        GitSource(f"file://{bare}", ref, path, cache_dir=tmp_path / "cache").fetch()


def test_unreachable_remote_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot fetch"):
        GitSource(f"file://{tmp_path}/gone.git", cache_dir=tmp_path / "cache").fetch()


def test_local_source_reads_a_directory_or_one_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.yaml").write_text("x: 1\n")
    (tmp_path / "m" / "mod.wasm").write_bytes(b"w")
    revision = LocalSource(tmp_path / "m").fetch()
    assert dict(revision.files) == {"x.yaml": b"x: 1\n"}
    assert revision.read("mod.wasm") == b"w"
    (tmp_path / "secret.wasm").write_bytes(b"outside")
    assert revision.read("../secret.wasm") is None
    single = LocalSource(tmp_path / "m" / "x.yaml").fetch()
    assert list(single.files) == ["x.yaml"]
    assert single.id == revision.id  # same content, same revision id
    with pytest.raises(SourceError, match="does not exist"):
        LocalSource(tmp_path / "nothing").fetch()


def test_lock_makes_the_second_pass_wait(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "fleet.lock"
    order: list[str] = []
    holding = threading.Event()
    messages: list[str] = []

    def first() -> None:
        with fleet_lock(path):
            order.append("first-in")
            holding.set()
            time.sleep(0.3)
            order.append("first-out")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(5)
    with fleet_lock(path, on_wait=messages.append):
        order.append("second-in")
    thread.join()
    assert order == ["first-in", "first-out", "second-in"]
    assert messages and "another pass on this fleet is running" in messages[0]

    with fleet_lock(path), pytest.raises(LockTimeout), fleet_lock(path, timeout=0.1):
        pass
