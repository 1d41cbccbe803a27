"""The board core's message fixtures (``zephyr/fixtures``) against the pydantic models.

The C tests encode the same messages and compare them byte for byte with these files; here
every file must decode with its model and encode back to exactly its own bytes, so the board
and pydantic agree on the wire format.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.messages import (
    Announce,
    ArtifactOffer,
    ArtifactRequest,
    DesiredSet,
    Heartbeat,
    Message,
    Presence,
    ReportedState,
    Runtime,
    TaskResult,
    decode,
)

ZEPHYR = Path(__file__).resolve().parents[2] / "zephyr"
FIXTURES = ZEPHYR / "fixtures"
FILES = sorted(FIXTURES.glob("*.json"))

# A fixture's model is named by the start of its file name.
MODELS: dict[str, type[Message]] = {
    "announce": Announce,
    "heartbeat": Heartbeat,
    "presence": Presence,
    "state": ReportedState,
    "result": TaskResult,
    "request": ArtifactRequest,
    "offer": ArtifactOffer,
    "desired": DesiredSet,
}


def model_of(path: Path) -> type[Message]:
    prefix = path.stem.split("_", 1)[0]
    if prefix not in MODELS:
        raise AssertionError(f"{path.name}: no model for the prefix {prefix!r}")
    return MODELS[prefix]


def board_default(name: str) -> int:
    """A size's default in the core's config header."""
    config = (ZEPHYR / "core" / "include" / "propeller" / "config.h").read_text()
    found = re.search(rf"#define {name} (\d+)", config)
    assert found is not None, f"{name} not in config.h"
    return int(found.group(1))


def test_fixtures_exist() -> None:
    assert {model_of(path) for path in FILES} == set(MODELS.values())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_fixture_round_trips(path: Path) -> None:
    payload = path.read_bytes()
    assert not payload.endswith(b"\n"), "a fixture holds exactly the message bytes"
    message = decode(model_of(path), payload)
    assert message.encode() == payload


@pytest.mark.parametrize(
    "path", [p for p in FILES if model_of(p) is DesiredSet], ids=lambda p: p.name
)
def test_desired_fixtures_are_valid_sets(path: Path) -> None:
    desired = decode(DesiredSet, path.read_bytes())
    assert desired.generation >= 1
    assert desired.tasks
    assert len({task.name for task in desired.tasks}) == len(desired.tasks)


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if model_of(p) in (Announce, ReportedState)],
    ids=lambda p: p.name,
)
def test_board_identity_fixtures(path: Path) -> None:
    message = decode(model_of(path), path.read_bytes())
    assert isinstance(message, Announce | ReportedState)
    assert message.runtime is Runtime.WAMR
    assert message.max_tasks == board_default("PB_MAX_TASKS")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_fixture_used_by_the_c_tests(path: Path) -> None:
    sources = "".join(p.read_text() for p in sorted((ZEPHYR / "tests").glob("*.c")))
    assert f'"{path.name}"' in sources, f"{path.name} is not checked by any C test"
