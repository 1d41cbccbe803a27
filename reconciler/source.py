"""Where desired state comes from: a Git repository at a resolved commit, or a local path.

A Git source keeps one bare clone per URL in a cache directory, fetches the ref, and reads the
manifests at that commit straight from the object store (no work tree). Module files referenced
by manifests are read from the same commit.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from git import Commit, Repo

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml")
ENV_CACHE_DIR = "PROPELLER_CACHE_DIR"
_SHA = re.compile(r"^[0-9a-f]{40}$")


class SourceError(Exception):
    """The source could not be read: remote unreachable, unknown ref, missing path."""


@dataclass(frozen=True, slots=True)
class Revision:
    """Manifest files of one revision, and a reader for any other file at the same revision."""

    id: str
    files: Mapping[str, bytes]
    read: Callable[[str], bytes | None]
    origin: str

    @property
    def short(self) -> str:
        return self.id[:12]


def default_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "propctl"


def _normalise(path: str) -> str:
    clean = str(PurePosixPath("/", path)).lstrip("/")
    return clean


class LocalSource:
    """``-f PATH``: one manifest file or a directory of them; module paths are relative to it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fetch(self) -> Revision:
        path = self.path
        if not path.exists():
            raise SourceError(f"{path} does not exist")
        root = path if path.is_dir() else path.parent
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file()
            )
        else:
            found = [path]
        files = {str(p.relative_to(root)): p.read_bytes() for p in found}
        digest = hashlib.sha256()
        for name, data in sorted(files.items()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())

        def read(relative: str) -> bytes | None:
            target = (root / _normalise(relative)).resolve()
            if not target.is_relative_to(root.resolve()) or not target.is_file():
                return None
            return target.read_bytes()

        return Revision(f"local:{digest.hexdigest()[:12]}", files, read, str(path))


class GitSource:
    """``--repo URL [--ref REF] [--path DIR]``: any URL git can fetch, including ``file://``."""

    def __init__(
        self, url: str, ref: str | None = None, path: str = ".", cache_dir: Path | None = None
    ) -> None:
        self.url = url
        self.ref = ref
        self.path = _normalise(path)
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        self.clone_dir = (cache_dir or default_cache_dir()) / "repos" / key
        # The branch the remote's HEAD points to, learnt on the first fetch without a ref.
        self.default_branch: str | None = None

    def fetch(self) -> Revision:
        with _locked(self.clone_dir.with_suffix(".lock")):
            commit = self._resolve(self._open())
        tree = commit.tree
        files: dict[str, bytes] = {}
        try:
            subtree = tree if self.path in ("", ".") else tree / self.path
        except KeyError:
            raise SourceError(
                f"path {self.path!r} does not exist in {self.url} at {commit.hexsha[:12]}"
            ) from None
        if subtree.type != "tree":
            raise SourceError(f"path {self.path!r} in {self.url} is not a directory")
        for item in subtree.traverse():
            path = str(getattr(item, "path", ""))
            if getattr(item, "type", "") == "blob" and path.endswith(MANIFEST_SUFFIXES):
                files[path] = item.data_stream.read()  # type: ignore[union-attr]

        def read(relative: str) -> bytes | None:
            try:
                blob = tree / _normalise(relative)
            except KeyError:
                return None
            if blob.type != "blob":
                return None
            data: bytes = blob.data_stream.read()
            return data

        ref = self.ref or "HEAD"
        return Revision(commit.hexsha, files, read, f"{self.url}@{ref}")

    def _open(self) -> Repo:
        import git as gitmod

        if (self.clone_dir / "HEAD").exists():
            return gitmod.Repo(self.clone_dir)
        self.clone_dir.mkdir(parents=True, exist_ok=True)
        repo = gitmod.Repo.init(self.clone_dir, bare=True)
        repo.create_remote("origin", self.url)
        return repo

    def _resolve(self, repo: Repo) -> Commit:
        import git as gitmod

        ref = self.ref or "HEAD"
        refspec = ref if not _SHA.match(ref) else "+refs/heads/*:refs/remotes/origin/*"
        try:
            repo.git.fetch("--quiet", "--no-tags", "origin", refspec)
        except gitmod.GitCommandError as exc:
            detail = _last_line(exc.stderr) or str(exc)
            raise SourceError(f"cannot fetch {ref!r} from {self.url}: {detail}") from None
        if self.ref is None and self.default_branch is None:
            self.default_branch = _head_branch(repo)
        target = ref if _SHA.match(ref) else "FETCH_HEAD"
        try:
            return repo.commit(target)
        except (gitmod.BadName, ValueError):
            raise SourceError(f"{ref!r} is not a commit in {self.url}") from None


def _head_branch(repo: Repo) -> str | None:
    """The branch the remote's HEAD names (``git ls-remote --symref``), if it says."""
    import git as gitmod

    try:
        listing = str(repo.git.ls_remote("--symref", "origin", "HEAD"))
    except gitmod.GitCommandError:
        return None
    for line in listing.splitlines():
        if line.startswith("ref: refs/heads/"):
            return line.split()[1].removeprefix("refs/heads/")
    return None


def _last_line(text: str | None) -> str:
    """Git's own reason: its first ``fatal:`` line, or else its last line."""
    lines = [line.strip().removeprefix("stderr: ").strip("'").strip() for line in
             (text or "").splitlines() if line.strip()]  # fmt: skip
    fatal = [line for line in lines if line.startswith("fatal:")]
    return (fatal[0] if fatal else lines[-1] if lines else "").removeprefix("fatal: ")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


Source = LocalSource | GitSource
