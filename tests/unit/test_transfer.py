"""Artifact reassembly and the requester's retry decisions, without a broker."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from proplet.transfer import Timing, Transfers
from schemas.chunks import Assembly
from schemas.messages import ArtifactOffer

DATA = bytes(range(256)) * 41  # 10,496 bytes: 10 full chunks of 1 KiB and a short last one
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
CS = 1024


def chunks(data: bytes = DATA, size: int = CS) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_assembly_any_order() -> None:
    a = Assembly(DIGEST, len(DATA), CS)
    parts = chunks()
    assert a.count == 11
    for index in reversed(range(len(parts))):
        assert a.add(index, parts[index])
    assert a.complete
    assert a.verified() == DATA


@pytest.mark.parametrize(
    ("index", "data"),
    [(0, b"short"), (10, DATA[-10:]), (11, b"x" * CS), (-1, b"x" * CS), (3, b"y" * (CS + 1))],
)
def test_assembly_refuses_misfit_chunks(index: int, data: bytes) -> None:
    a = Assembly(DIGEST, len(DATA), CS)
    assert not a.add(index, data)
    assert len(a.missing()) == 11


def test_assembly_detects_corruption() -> None:
    a = Assembly(DIGEST, len(DATA), CS)
    parts = chunks()
    parts[4] = b"\x00" * CS
    for i, part in enumerate(parts):
        a.add(i, part)
    assert a.complete
    assert a.verified() is None


def offer(size: int = len(DATA), error: str | None = None) -> ArtifactOffer:
    return ArtifactOffer(
        digest=DIGEST, size=size, chunk_size=CS, chunks=-(-size // CS), error=error
    )


def test_transfer_resumes_missing_chunks_only_after_a_stall() -> None:
    t = Transfers("p1", CS, Timing(stall=1.0, initial=0.5, maximum=8.0))
    first = t.want(DIGEST, None, now=0.0)
    assert first is not None and first.chunks is None and first.chunk_size == CS
    assert t.want(DIGEST, None, now=0.1) is None  # already in flight
    t.on_offer(offer(), now=0.1)
    parts = chunks()
    for i in (0, 1, 2, 5):
        assert t.on_chunk(DIGEST, i, parts[i], now=0.2) is None
    assert t.due(now=0.5) == []  # still within the stall window
    (resume,) = t.due(now=1.3)
    assert resume.chunks == [3, 4, 6, 7, 8, 9, 10]
    for i in resume.chunks:
        content = t.on_chunk(DIGEST, i, parts[i], now=1.4)
    assert content == DATA
    assert DIGEST not in t


def test_transfer_refetches_whole_artifact_after_digest_mismatch() -> None:
    t = Transfers("p1", CS, Timing(stall=1.0, initial=0.5, maximum=8.0))
    t.want(DIGEST, None, now=0.0)
    t.on_offer(offer(), now=0.0)
    parts = chunks()
    parts[0] = b"\x01" * CS
    results = [t.on_chunk(DIGEST, i, p, now=0.1) for i, p in enumerate(parts)]
    assert results == [None] * len(parts)
    wanted = t.waiting(DIGEST)
    assert wanted is not None and wanted.failures
    (again,) = t.due(now=5.0)
    assert again.chunks is None  # from the start, not a resume


def test_transfer_backs_off_after_an_error_offer() -> None:
    t = Transfers("p1", CS, Timing(stall=1.0, initial=0.5, maximum=4.0))
    t.want(DIGEST, "reg/app:1", now=0.0)
    assert t.on_offer(offer(error="manifest unknown"), now=0.0) == "manifest unknown"
    times = []
    now = 0.0
    for _ in range(6):
        deadline = t.next_deadline()
        assert deadline is not None
        now = deadline
        (request,) = t.due(now)
        assert request.image == "reg/app:1"
        t.on_offer(offer(error="manifest unknown"), now=now)
        times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == sorted(gaps)  # never shrinking
    assert max(gaps) <= 4.0


def test_resend_after_reconnect_resumes_partial_transfers() -> None:
    t = Transfers("p1", CS)
    t.want(DIGEST, None, now=0.0)
    t.on_offer(offer(), now=0.0)
    t.on_chunk(DIGEST, 0, chunks()[0], now=0.0)
    (request,) = t.resend(now=0.1)
    assert request.chunks == list(range(1, 11))


def test_large_artifacts_in_small_chunks_arrive_window_by_window() -> None:
    from proplet.transfer import WINDOW

    size = (2 * WINDOW + 10) * 64  # 1,034 chunks of 64 bytes
    data = bytes(i % 251 for i in range(size))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    t = Transfers("p1", 64, Timing(stall=1.0, initial=0.5, maximum=8.0))
    first = t.want(digest, None, now=0.0, size=size)
    assert first is not None and first.chunks == list(range(WINDOW))
    t.on_offer(ArtifactOffer(digest=digest, size=size, chunk_size=64, chunks=size // 64), now=0.0)
    asked = [first.chunks]
    content = None
    now = 0.0
    while content is None:
        assert t.due(now) == []  # nothing more until this window is in
        for index in asked[-1]:
            content = t.on_chunk(digest, index, data[index * 64 : (index + 1) * 64], now)
        if content is None:
            (request,) = t.due(now)  # due at once, without waiting for a stall
            assert request.chunks is not None
            asked.append(request.chunks)
        now += 0.01
    assert content == data
    assert [len(window) for window in asked] == [WINDOW, WINDOW, 10]
