"""A Git remote for tests and benchmarks: a bare repository and a work clone under a tmp dir.

``GitRepo(tmp)`` creates ``tmp/remote.git`` (bare, reached as ``repo.url``, a ``file://`` URL)
and ``tmp/remote-work`` (its clone, on ``main``). Write or remove files in the clone, then
``push()`` commits everything and pushes it, returning the new commit's sha::

    repo = GitRepo(tmp_path)
    repo.write("fleet/add.yaml", MANIFEST)
    repo.copy(WASM_DIR / "add.wasm", "modules/add.wasm")
    sha = repo.push("add the add task")
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_IDENTITY = ("-c", "user.name=propeller-tests", "-c", "user.email=tests@example.org")


def git(cwd: Path, *args: str) -> str:
    """Run git in ``cwd`` with a fixed identity and no global config; return its stripped stdout."""
    done = subprocess.run(
        ["git", *_IDENTITY, "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        # The user's own git config (signing, hooks, templates) must not change the test repos.
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull},
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip()


class GitRepo:
    """A bare remote and a work clone of it, on branch ``main``."""

    def __init__(self, root: Path, name: str = "remote") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.bare = root / f"{name}.git"
        self.work = root / f"{name}-work"
        git(root, "init", "-q", "--bare", "-b", "main", str(self.bare))
        git(root, "init", "-q", "-b", "main", str(self.work))
        git(self.work, "remote", "add", "origin", str(self.bare))

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def write(self, path: str, content: str | bytes) -> Path:
        """Write ``content`` to ``path`` (relative to the repository root) in the clone."""
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        return target

    def copy(self, source: Path, path: str) -> Path:
        """Copy a file from outside into the clone at ``path``."""
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def remove(self, path: str) -> None:
        target = self.work / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    def commit(self, message: str = "update") -> str:
        """Commit every change in the clone (also an empty commit); return the commit sha."""
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def push(self, message: str = "update") -> str:
        """Commit every change and push ``main`` (and tags); return the pushed commit sha."""
        sha = self.commit(message)
        git(self.work, "push", "-q", "origin", "main", "--tags")
        return sha

    def tag(self, name: str, ref: str = "HEAD") -> str:
        """Tag ``ref`` and push the tag; return the tagged commit sha."""
        git(self.work, "tag", name, ref)
        git(self.work, "push", "-q", "origin", f"refs/tags/{name}")
        return git(self.work, "rev-parse", f"{name}^{{commit}}")

    def head(self) -> str:
        return git(self.work, "rev-parse", "HEAD")
