"""The wire protocol: topics, message validation and the exported JSON Schema files."""

from __future__ import annotations

import json

import pytest

from schemas import export
from schemas.messages import (
    MAX_MESSAGE_BYTES,
    ArtifactRequest,
    DecodeError,
    DesiredSet,
    Heartbeat,
    TaskResult,
    TaskState,
    decode,
)
from schemas.topics import Kind, Namespace, Parsed, TopicError

NS = Namespace("dom", "ch")
HEX = "ab" * 32


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (NS.desired("p1"), Parsed(Kind.DESIRED, proplet="p1")),
        (NS.state("p-2"), Parsed(Kind.STATE, proplet="p-2")),
        (NS.presence("p1"), Parsed(Kind.PRESENCE, proplet="p1")),
        (NS.heartbeat("p1"), Parsed(Kind.HEARTBEAT, proplet="p1")),
        (NS.announce("p1"), Parsed(Kind.ANNOUNCE, proplet="p1")),
        (NS.result("p1", "job"), Parsed(Kind.RESULT, proplet="p1", task="job")),
        (NS.artifact_offer("p1", HEX), Parsed(Kind.ARTIFACT_OFFER, proplet="p1", digest_hex=HEX)),
        (
            NS.artifact_chunk("p1", HEX, 7),
            Parsed(Kind.ARTIFACT_CHUNK, proplet="p1", digest_hex=HEX, index=7),
        ),
        (NS.artifact_request(), Parsed(Kind.ARTIFACT_REQUEST)),
        (NS.status(), Parsed(Kind.STATUS)),
    ],
)
def test_topics_round_trip(topic: str, expected: Parsed) -> None:
    assert topic.startswith("m/dom/c/ch/")
    assert NS.parse(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "m/other/c/ch/proplets/p1/desired",
        "m/dom/c/ch/proplets/p1/unknown",
        "m/dom/c/ch/proplets/p1",
        "m/dom/c/ch/proplets/+/desired",
        "m/dom/c/ch/proplets/p1/artifacts/nothex/0",
        f"m/dom/c/ch/proplets/p1/artifacts/{HEX}/-1",
        f"m/dom/c/ch/proplets/p1/artifacts/{HEX}/99999999999",
        "m/dom/c/ch/proplets/p1/results/Bad_Name!",
    ],
)
def test_bad_topics_rejected(topic: str) -> None:
    with pytest.raises(TopicError):
        NS.parse(topic)


@pytest.mark.parametrize("segment", ["", "a/b", "+", "#", "-lead", "x" * 64])
def test_bad_segments_rejected(segment: str) -> None:
    with pytest.raises(TopicError):
        Namespace(segment, "ch")
    with pytest.raises(TopicError):
        NS.desired(segment)


def test_decode_rejects_unknown_fields_and_coercion() -> None:
    good = Heartbeat(proplet="p", seq=1, ts=1.5, interval_s=1, running=0, observed_generation=2)
    assert decode(Heartbeat, good.encode()) == good
    body = json.loads(good.encode())
    with pytest.raises(DecodeError, match="evil: Extra inputs"):
        decode(Heartbeat, json.dumps({**body, "evil": 1}).encode())
    with pytest.raises(DecodeError, match="seq"):
        decode(Heartbeat, json.dumps({**body, "seq": "1"}).encode())
    with pytest.raises(DecodeError, match="exceeds"):
        decode(Heartbeat, b" " * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(DecodeError):
        decode(Heartbeat, b"\xff\xfe not json")


def test_desired_set_limits_are_flat() -> None:
    raw = {
        "generation": 3,
        "tasks": [
            {
                "name": "hello",
                "spec_hash": "abc",
                "owner": "propctl",
                "digest": "sha256:" + HEX,
                "size": 10,
                "memory": 1 << 20,
                "timeout_ms": 500,
            }
        ],
    }
    desired = decode(DesiredSet, json.dumps(raw).encode())
    assert desired.tasks[0].memory == 1 << 20
    assert desired.tasks[0].function is None
    with pytest.raises(DecodeError, match="generation"):
        decode(DesiredSet, json.dumps({**raw, "generation": 0}).encode())
    bad_task = {**raw["tasks"][0], "name": "Not_A_Label"}
    with pytest.raises(DecodeError, match="name"):
        decode(DesiredSet, json.dumps({**raw, "tasks": [bad_task]}).encode())


@pytest.mark.parametrize("chunk_size", [0, 63, 4 * 1024 * 1024 + 1])
def test_chunk_size_bounds(chunk_size: int) -> None:
    body = {"proplet": "p", "digest": "sha256:" + HEX, "chunk_size": chunk_size}
    with pytest.raises(DecodeError, match="chunk_size"):
        decode(ArtifactRequest, json.dumps(body).encode())


def test_result_state_is_terminal() -> None:
    with pytest.raises(ValueError, match="state"):
        TaskResult(
            proplet="p",
            task="t",
            spec_hash="h",
            state=TaskState.RUNNING,
            runs=1,
            started_at=1.0,
            finished_at=2.0,
        )


def test_exported_json_schemas_are_current() -> None:
    on_disk = {p.name: p.read_text() for p in export.JSON_DIR.glob("*.schema.json")}
    expected = export.rendered()
    stale = sorted(n for n in expected if on_disk.get(n) != expected[n])
    extra = sorted(set(on_disk) - set(expected))
    assert not stale and not extra, (
        f"schemas/json is stale ({stale}, unexpected {extra}); run python -m schemas.export"
    )
