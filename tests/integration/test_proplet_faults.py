"""Malformed messages and broken artifact transfers: the agent drops them and keeps serving."""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.messages import (
    ArtifactOffer,
    ArtifactRequest,
    DecodeError,
    DesiredSet,
    Message,
    TaskState,
    decode,
)
from tests.broker import Mosquitto
from tests.fleet import Fleet, module, running_fleet, task

pytestmark = pytest.mark.integration

ADD = module("add")
FOREVER = module("forever")


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path) as f:
        yield f


def _bad_values() -> list[Any]:
    return [None, "x", "", -1, 1.5, [], {}, True, "9" * 400, 2**53, 10**30, "sha256:" + "0" * 63]


def malformed_desired_sets() -> list[bytes]:
    base = {
        "generation": 50,
        "tasks": [
            {
                "name": "evil",
                "spec_hash": "h",
                "owner": "propctl",
                "digest": ADD.digest,
                "size": len(ADD.data),
                "function": "add",
                "args": ["1", "2"],
            }
        ],
    }
    payloads: list[bytes] = [
        b"", b"not json", b"\xff\xfe\x00", b"[]", b"null", b"123", b'"text"', b"{",
        b"[" * 5000 + b"]" * 5000, b'{"generation": 50}' + b" " * (300 * 1024),
        json.dumps({**base, "unknown": 1}).encode(),
    ]  # fmt: skip
    for key in ("generation", "tasks"):
        for bad in _bad_values():
            payloads.append(json.dumps({**base, key: bad}).encode())
    for key in ("name", "spec_hash", "owner", "digest", "size", "function", "args", "env",
                "memory", "timeout_ms", "fuel", "daemon", "extra"):  # fmt: skip
        for bad in _bad_values():
            broken = {**base["tasks"][0], key: bad}  # type: ignore[index]
            payloads.append(json.dumps({**base, "tasks": [broken]}).encode())
    return [p for p in payloads if not _valid(DesiredSet, p)]


def malformed_offers(digest_hex: str) -> list[bytes]:
    good = {"digest": "sha256:" + digest_hex, "size": 10, "chunk_size": 1024, "chunks": 1}
    payloads = [b"", b"{}", b"garbage", json.dumps({**good, "digest": ADD.digest}).encode()]
    for key in good:
        for bad in _bad_values():
            payloads.append(json.dumps({**good, key: bad}).encode())
    return [p for p in payloads if not _valid(ArtifactOffer, p)]


def _valid(model: type[Message], payload: bytes) -> bool:
    """Some mutations (a null optional field) are valid messages: those are not sent."""
    try:
        decode(model, payload)
    except DecodeError:
        return False
    return True


def test_hundreds_of_malformed_messages_are_dropped(fleet: Fleet) -> None:
    fleet.serve(ADD, FOREVER)
    p = fleet.start_proplet("p1")
    fleet.desire("p1", [task("server", FOREVER, daemon=True)])
    fleet.wait_task("p1", "server", lambda t: t.state == TaskState.RUNNING)
    beats_before = len(fleet.observed.heartbeats["p1"])

    ns = fleet.ns
    some_hex = hashlib.sha256(b"nothing").hexdigest()
    sent: list[tuple[str, bytes]] = []
    sent += [(ns.desired("p1"), payload) for payload in malformed_desired_sets()]
    sent += [(ns.artifact_offer("p1", some_hex), payload) for payload in malformed_offers(some_hex)]
    # Unsolicited, out-of-range and oversized chunks, and chunks for an artifact being fetched.
    sent += [(ns.artifact_chunk("p1", some_hex, i), bytes([i]) * i) for i in range(0, 40, 3)]
    server_hex = FOREVER.digest.removeprefix("sha256:")
    sent += [(ns.artifact_chunk("p1", server_hex, i), b"\x00" * 50) for i in (0, 7, 10**6)]
    sent += [(f"{ns.proplet_root('p1')}/artifacts/zz/0", b"x")]
    sent += [(f"{ns.proplet_root('p1')}/artifacts/{some_hex}/offer/extra", b"{}")]
    assert len(sent) >= 200
    for topic, payload in sent:
        fleet.client.publish(topic, payload, qos=1).wait_for_publish(5)

    # Still alive, still heartbeating, the daemon untouched, and still converging.
    fleet.wait(lambda o: len(o.heartbeats["p1"]) >= beats_before + 3, timeout=10)
    assert p.process.poll() is None
    status = fleet.task_status("p1", "server")
    assert status is not None and (status.state, status.runs) == (TaskState.RUNNING, 1)
    assert fleet.state("p1").observed_generation == 1
    fleet.desire("p1", [task("after", ADD, function="add", args=["1", "2"])], generation=2)
    assert fleet.wait_result("p1", "after").result == ["3"]
    assert "evil" not in [t.name for t in fleet.state("p1").tasks]
    assert p.log().count("dropped message") >= 150


def test_corrupt_and_truncated_transfers_are_refetched_never_run(fleet: Fleet) -> None:
    """A hostile server answers first with corrupted content, then truncated chunks."""
    requests: queue.SimpleQueue[ArtifactRequest] = queue.SimpleQueue()
    fleet.client.subscribe(
        fleet.ns.artifact_request(),
        lambda _t, payload, _r: requests.put(decode(ArtifactRequest, payload)),
        qos=1,
    )
    fleet.start_proplet("p1")
    fleet.desire("p1", [task("sum", ADD, function="add", args=["40", "2"])])
    hex_digest = ADD.digest.removeprefix("sha256:")
    data = ADD.data
    chunk = 64

    def answer(request: ArtifactRequest, content: bytes, indices: list[int] | None = None) -> None:
        count = -(-len(data) // chunk)
        offer = ArtifactOffer(digest=ADD.digest, size=len(data), chunk_size=chunk, chunks=count)
        fleet.client.publish(fleet.ns.artifact_offer("p1", hex_digest), offer.encode())
        for i in indices if indices is not None else range(count):
            part = content[i * chunk : (i + 1) * chunk]
            fleet.client.publish(fleet.ns.artifact_chunk("p1", hex_digest, i), part)

    first = requests.get(timeout=10)
    assert first.digest == ADD.digest and first.chunks is None
    corrupted = bytearray(data)
    corrupted[-5] ^= 0xFF
    answer(first, bytes(corrupted))

    second = requests.get(timeout=10)
    assert second.chunks is None  # a digest mismatch restarts the transfer from scratch
    truncated = data[:chunk] + data[chunk : 2 * chunk - 10]
    answer(second, truncated, indices=[0, 1])  # chunk 1 is short: refused, the rest missing

    third = requests.get(timeout=10)
    assert third.chunks is not None and 0 not in third.chunks and 1 in third.chunks
    answer(third, data, indices=third.chunks)

    result = fleet.wait_result("p1", "sum")
    assert (result.state, result.result, result.runs) == (TaskState.COMPLETED, ["42"], 1)


def test_artifact_nobody_serves_is_waited_for_with_backoff(fleet: Fleet) -> None:
    requests: list[float] = []
    fleet.client.subscribe(
        fleet.ns.artifact_request(), lambda _t, _p, _r: requests.append(time.monotonic()), qos=1
    )
    fleet.start_proplet("p1")
    fleet.desire("p1", [task("sum", ADD, function="add", args=["1", "1"])])
    status = fleet.wait_task(
        "p1", "sum", lambda t: t.reason is not None and "waiting for artifact" in t.reason
    )
    assert status.state == TaskState.PENDING
    fleet.wait(lambda _o: len(requests) >= 3, timeout=10, what="three requests")
    gaps = [b - a for a, b in itertools.pairwise(requests)]
    assert gaps[1] >= gaps[0] * 1.5  # backing off, not hammering
    fleet.serve(ADD)
    assert fleet.wait_result("p1", "sum", timeout=15).result == ["2"]
