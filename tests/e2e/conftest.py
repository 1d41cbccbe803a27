"""Fixtures of the end-to-end tests: a fleet of real proplets, propctl, a Git remote, a watch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Mosquitto
from tests.e2e.support import WASM_DIR, DesiredWatch, Propctl
from tests.fleet import Fleet, running_fleet
from tests.gitrepo import GitRepo


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    """Proplets on the test's broker; propctl serves the modules, so nothing is served here."""
    with running_fleet(broker, tmp_path / "fleet") as f:
        yield f


@pytest.fixture
def propctl(broker: Mosquitto, tmp_path: Path) -> Propctl:
    return Propctl(broker.url, tmp_path)


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    """A Git remote holding the test modules under ``modules/`` (not committed yet)."""
    remote = GitRepo(tmp_path / "git")
    for name in ("add", "hello", "sleepy"):
        remote.copy(WASM_DIR / f"{name}.wasm", f"modules/{name}.wasm")
    return remote


@pytest.fixture
def watch(broker: Mosquitto) -> Iterator[DesiredWatch]:
    w = DesiredWatch(broker.url)
    try:
        yield w
    finally:
        w.close()
