"""Uploads of run outputs, both ends without a network: what the proplet collects and publishes
(``proplet.files``) and how the reconciler reassembles it (``reconciler.uploads``)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from proplet import files
from reconciler.broker import Handler
from reconciler.uploads import Uploads
from schemas.messages import ArtifactOffer, chunk_count
from schemas.topics import Namespace

NS = Namespace("dom", "ch")
CHUNK = 64  # the protocol's smallest chunk: many chunks from a few bytes
Messages = list[tuple[str, bytes]]
Reorder = Callable[[Messages], Messages]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeBroker:
    """Routes published messages to subscribed handlers, in the order the test chooses."""

    def __init__(self) -> None:
        self.handlers: list[tuple[str, Handler, int]] = []

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        self.handlers.append((topic_filter, handler, qos))

    def deliver(self, topic: str, payload: bytes) -> None:
        for topic_filter, handler, _ in self.handlers:
            if mqtt.topic_matches_sub(topic_filter, topic):
                handler(topic, payload, False)


class Ack:
    def __init__(self, published: bool = True) -> None:
        self.published = published
        self.waited = 0

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self.waited += 1

    def is_published(self) -> bool:
        return self.published


class Recorder:
    """A publisher for ``files.upload`` that keeps every message."""

    def __init__(self, acks: bool = True) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.acks: list[Ack] = []
        self._published = acks

    def __call__(self, topic: str, payload: bytes) -> Ack:
        self.messages.append((topic, payload))
        ack = Ack(self._published)
        self.acks.append(ack)
        return ack


def messages(data: bytes, proplet: str = "p1", chunk_size: int = CHUNK) -> list[tuple[str, bytes]]:
    """The offer then the chunks of an upload of ``data``, as a proplet publishes them."""
    digest = sha256(data)
    hex_ = digest[7:]
    count = chunk_count(len(data), chunk_size)
    offer = ArtifactOffer(digest=digest, size=len(data), chunk_size=chunk_size, chunks=count)
    chunks = [
        (NS.upload_chunk(proplet, hex_, i), data[i * chunk_size : (i + 1) * chunk_size])
        for i in range(count)
    ]
    return [(NS.upload_offer(proplet, hex_), offer.encode()), *chunks]


def receiver(
    *,
    max_bytes: int = 1024**2,
    max_upload_bytes: int = 1024**2,
    stall_seconds: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Uploads, FakeBroker, list[tuple[str, str]]]:
    completed: list[tuple[str, str]] = []
    uploads = Uploads(
        NS,
        max_bytes=max_bytes,
        max_upload_bytes=max_upload_bytes,
        stall_seconds=stall_seconds,
        on_complete=lambda p, d: completed.append((p, d)),
        clock=clock,
    )
    broker = FakeBroker()
    uploads.attach(broker)
    return uploads, broker, completed


DATA = bytes(range(256)) * 3 + b"tail"  # 772 bytes: 13 chunks, the last one short


# -- reassembly -----------------------------------------------------------------------------


def test_subscribes_to_every_proplets_uploads_at_qos_1() -> None:
    _, broker, _ = receiver()
    assert [(f, q) for f, _, q in broker.handlers] == [("m/dom/c/ch/proplets/+/uploads/#", 1)]


def test_in_order_upload_completes_once_and_wakes_the_owner() -> None:
    uploads, broker, completed = receiver()
    for topic, payload in messages(DATA):
        assert uploads.get("p1", sha256(DATA)) is None  # never before the last chunk
        broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(DATA)) == DATA
    assert completed == [("p1", sha256(DATA))]
    assert uploads.dropped == 0
    assert uploads.in_progress() == []


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(lambda m: [m[0], *reversed(m[1:])], id="chunks-reversed"),
        pytest.param(lambda m: [*m[1:], m[0]], id="offer-last"),
        pytest.param(lambda m: [m[5], m[2], m[0], *m[8:], m[1], *m[3:5], *m[6:8]], id="shuffled"),
    ],
)
def test_any_order_reassembles_the_same_bytes(order: Reorder) -> None:
    uploads, broker, completed = receiver()
    for topic, payload in order(messages(DATA)):
        broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(DATA)) == DATA
    assert completed == [("p1", sha256(DATA))]


def test_duplicates_are_harmless() -> None:
    uploads, broker, completed = receiver()
    sent = messages(DATA)
    for topic, payload in [sent[0], sent[0], *sent[1:4], *sent[1:]]:
        broker.deliver(topic, payload)
    for topic, payload in sent:  # the whole upload again, after completion
        broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(DATA)) == DATA
    assert completed == [("p1", sha256(DATA))]
    assert uploads.dropped == 0


def test_a_chunk_whose_length_does_not_fit_its_index_is_refused() -> None:
    uploads, broker, completed = receiver()
    offer, *chunks = messages(DATA)
    broker.deliver(*offer)
    broker.deliver(chunks[0][0], chunks[0][1][:-1])  # short, and not the last chunk
    broker.deliver(chunks[-1][0], chunks[-1][1] + b"!")  # the last chunk, too long
    broker.deliver(NS.upload_chunk("p1", sha256(DATA)[7:], 13), b"x" * 4)  # past the end
    assert uploads.dropped == 3
    for topic, payload in chunks[:-1]:
        broker.deliver(topic, payload)
    assert completed == []  # the last chunk is still missing
    broker.deliver(*chunks[-1])
    assert uploads.get("p1", sha256(DATA)) == DATA


def test_an_early_chunk_that_does_not_fit_its_offer_is_refused() -> None:
    uploads, broker, _ = receiver()
    offer, first, *rest = messages(DATA)
    broker.deliver(first[0], first[1] + b"!")  # before the offer: kept, checked later
    assert uploads.dropped == 0
    broker.deliver(*offer)
    assert uploads.dropped == 1
    for topic, payload in rest:
        broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(DATA)) is None  # chunk 0 is still missing
    broker.deliver(*first)
    assert uploads.get("p1", sha256(DATA)) == DATA


def test_content_that_does_not_match_its_digest_is_thrown_away() -> None:
    uploads, broker, completed = receiver()
    forged = bytes(reversed(DATA))
    offer, *_ = messages(DATA)
    _, *forged_chunks = messages(forged)
    broker.deliver(*offer)
    hex_ = sha256(DATA)[7:]
    for index, (_, payload) in enumerate(forged_chunks):
        broker.deliver(NS.upload_chunk("p1", hex_, index), payload)
    assert uploads.get("p1", sha256(DATA)) is None
    assert completed == []
    assert uploads.dropped == 1
    assert uploads.in_progress() == []
    for topic, payload in messages(DATA):  # a good upload afterwards is kept
        broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(DATA)) == DATA


def test_uploads_are_kept_per_proplet() -> None:
    uploads, broker, _ = receiver()
    for topic, payload in messages(DATA, proplet="p2"):
        broker.deliver(topic, payload)
    assert uploads.get("p2", sha256(DATA)) == DATA
    assert uploads.get("p1", sha256(DATA)) is None


def test_an_empty_file_completes_with_its_offer() -> None:
    uploads, broker, completed = receiver()
    (offer,) = messages(b"")
    broker.deliver(*offer)
    assert uploads.get("p1", sha256(b"")) == b""
    assert completed == [("p1", sha256(b""))]


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (NS.upload_offer("p1", sha256(DATA)[7:]), b"{not json"),
        (NS.upload_offer("p1", sha256(b"other")[7:]), messages(DATA)[0][1]),  # topic != digest
        (
            NS.upload_offer("p1", sha256(DATA)[7:]),
            ArtifactOffer(digest=sha256(DATA), size=772, chunk_size=64, chunks=12).encode(),
        ),
        (
            NS.upload_offer("p1", sha256(DATA)[7:]),
            ArtifactOffer(
                digest=sha256(DATA), size=0, chunk_size=64, chunks=0, error="no"
            ).encode(),
        ),
        ("m/dom/c/ch/proplets/p1/uploads/nothex/offer", b"{}"),
        ("m/dom/c/ch/proplets/p1/uploads/" + "a" * 64 + "/x", b"{}"),
    ],
    ids=["not-json", "digest-not-topic", "wrong-chunk-count", "error", "bad-hex", "bad-index"],
)
def test_malformed_messages_are_dropped(topic: str, payload: bytes) -> None:
    uploads, broker, completed = receiver()
    broker.deliver(topic, payload)
    assert uploads.dropped == 1
    assert uploads.in_progress() == []
    assert completed == []


# -- bounds ---------------------------------------------------------------------------------


def test_completed_uploads_beyond_the_bound_drop_the_oldest() -> None:
    uploads, broker, _ = receiver(max_bytes=2000, max_upload_bytes=1000)
    blobs = [bytes([n]) * 700 for n in range(3)]
    for data in blobs:
        for topic, payload in messages(data):
            broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(blobs[0])) is None
    assert uploads.get("p1", sha256(blobs[1])) == blobs[1]
    assert uploads.get("p1", sha256(blobs[2])) == blobs[2]
    assert uploads.completed_bytes == 1400


def test_an_offer_over_the_upload_bound_is_refused() -> None:
    uploads, broker, _ = receiver(max_bytes=2000, max_upload_bytes=500)
    broker.deliver(*messages(DATA)[0])
    assert uploads.dropped == 1
    assert uploads.in_progress() == []


def test_uploads_in_progress_beyond_the_bound_give_up_the_oldest() -> None:
    uploads, broker, _ = receiver(max_bytes=1000, max_upload_bytes=1000)
    first, second = b"a" * 600, b"b" * 600
    broker.deliver(*messages(first)[0])
    broker.deliver(*messages(second)[0])  # 1,200 bytes in progress: the first goes
    assert uploads.in_progress() == [("p1", sha256(second))]
    for topic, payload in messages(second)[1:]:
        broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(second)) == second


def test_a_stalled_upload_is_given_up() -> None:
    now = [0.0]
    uploads, broker, _ = receiver(stall_seconds=60.0, clock=lambda: now[0])
    broker.deliver(*messages(DATA)[0])
    now[0] = 61.0
    broker.deliver(*messages(b"other")[0])
    assert uploads.in_progress() == [("p1", sha256(b"other"))]


def test_discard_forgets_and_a_new_upload_is_reassembled() -> None:
    uploads, broker, completed = receiver()
    for _ in range(2):
        for topic, payload in messages(DATA):
            broker.deliver(topic, payload)
        assert uploads.get("p1", sha256(DATA)) == DATA
        uploads.discard("p1", sha256(DATA))
        assert uploads.get("p1", sha256(DATA)) is None
    assert completed == [("p1", sha256(DATA))] * 2


def test_wait_wakes_when_the_upload_completes_and_times_out_otherwise() -> None:
    uploads, broker, _ = receiver()
    assert uploads.wait("p1", sha256(DATA), timeout=0.01) is None
    got: list[bytes | None] = []
    waiter = threading.Thread(target=lambda: got.append(uploads.wait("p1", sha256(DATA), 5.0)))
    waiter.start()
    for topic, payload in messages(DATA):
        broker.deliver(topic, payload)
    waiter.join(5.0)
    assert got == [DATA]


def test_a_failing_callback_does_not_lose_the_upload() -> None:
    def fail(_proplet: str, _digest: str) -> None:
        raise RuntimeError("boom")

    uploads = Uploads(NS, on_complete=fail)
    broker = FakeBroker()
    uploads.attach(broker)
    for topic, payload in messages(DATA):
        broker.deliver(topic, payload)
    assert uploads.get("p1", sha256(DATA)) == DATA


# -- the proplet's side: what is collected and how it is published --------------------------


def write(directory: Path, files_: dict[str, bytes]) -> None:
    for name, data in files_.items():
        (directory / name).write_bytes(data)


def test_collect_hashes_plain_files_sorted_by_name(tmp_path: Path) -> None:
    write(tmp_path, {"b.bin": b"bb", "a.txt": b"a", "empty": b""})
    collected = files.collect(tmp_path, limit=3)
    assert [(f.name, f.digest, f.size) for f in collected] == [
        ("a.txt", sha256(b"a"), 1),
        ("b.bin", sha256(b"bb"), 2),
        ("empty", sha256(b""), 0),
    ]


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda d: (d / "sub").mkdir(), "outputs: /out/sub is a directory; only plain files"),
        (lambda d: os.symlink("a.txt", d / "link"), "outputs: /out/link is a symbolic link"),
        (lambda d: os.mkfifo(d / "pipe"), "outputs: /out/pipe is not a regular file"),
        (
            lambda d: (d / "-dash").write_bytes(b""),
            "outputs: file name '-dash' is not allowed",
        ),
        (
            lambda d: (d / "x\n").write_bytes(b""),
            "outputs: file name 'x\\n' is not allowed",
        ),
        (
            lambda d: write(d, {f"f{i}": b"" for i in range(8)}),
            "outputs: 9 files written, the limit is 8",
        ),
        (lambda d: write(d, {"z": b"12345"}), "outputs: 6 bytes written, the limit is 5"),
    ],
    ids=["directory", "symlink", "fifo", "bad-name", "newline", "too-many", "too-big"],
)
def test_collect_refuses_what_cannot_be_an_output(
    tmp_path: Path, make: Callable[[Path], object], error: str
) -> None:
    write(tmp_path, {"a.txt": b"1"})
    make(tmp_path)
    with pytest.raises(files.FilesError) as caught:
        files.collect(tmp_path, limit=5)
    assert str(caught.value).startswith(error)


def test_upload_publishes_offer_then_chunks_that_reassemble(tmp_path: Path) -> None:
    write(tmp_path, {"model.npy": DATA})
    (output,) = files.collect(tmp_path, limit=10_000)
    publish = Recorder()
    count = files.upload(output, NS, "p1", publish, chunk_size=CHUNK, window_bytes=256)
    assert count == 13
    assert publish.messages == messages(DATA)
    # Acknowledgements were awaited window by window, the newest left in flight.
    waited = [ack.waited for ack in publish.acks]
    assert 0 < sum(waited) < len(waited)
    assert waited[-1] == 0
    uploads, broker, _ = receiver()
    for topic, payload in publish.messages:
        broker.deliver(topic, payload)
    assert uploads.get("p1", output.digest) == DATA
    assert output.ref().model_dump() == {"name": "model.npy", "digest": sha256(DATA), "size": 772}


def test_upload_fails_when_the_broker_does_not_acknowledge(tmp_path: Path) -> None:
    write(tmp_path, {"a.txt": DATA})
    (output,) = files.collect(tmp_path, limit=10_000)
    with pytest.raises(files.FilesError, match=r"a\.txt not uploaded: the broker did not"):
        files.upload(output, NS, "p1", Recorder(acks=False), chunk_size=CHUNK, window_bytes=128)


def test_upload_refuses_a_file_changed_after_it_was_hashed(tmp_path: Path) -> None:
    write(tmp_path, {"a.txt": DATA})
    (output,) = files.collect(tmp_path, limit=10_000)
    write(tmp_path, {"a.txt": DATA[::-1]})
    with pytest.raises(files.FilesError, match="changed while it was uploaded"):
        files.upload(output, NS, "p1", Recorder(), chunk_size=CHUNK)


def test_stage_links_inputs_and_makes_an_empty_out(tmp_path: Path) -> None:
    source = tmp_path / "store-file"
    source.write_bytes(b"model")
    workspace = files.stage(tmp_path / "runs", "task.1", [("m.npy", source)], outputs=True)
    assert workspace.inputs is not None and workspace.outputs is not None
    assert (workspace.inputs / "m.npy").read_bytes() == b"model"
    assert (workspace.inputs / "m.npy").stat().st_ino == source.stat().st_ino  # no copy
    assert list(workspace.outputs.iterdir()) == []
    workspace.remove()
    assert not workspace.root.exists()
    assert source.read_bytes() == b"model"
    with pytest.raises(files.FilesError, match="input gone: artifact vanished"):
        files.stage(tmp_path / "runs", "task.2", [("gone", tmp_path / "missing")], outputs=False)
    assert not (tmp_path / "runs" / "task.2").exists()
