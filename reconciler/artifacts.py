"""Serving artifacts to proplets over the chunked transfer: offer, then the requested chunks.

The server answers only for digests its ``lookup`` knows (another server may hold the rest), and
verifies the content against the digest before the first chunk leaves. ``publish_artifact`` and
``publish_refusal`` are the answer itself, shared with the registry proxy (``reconciler.proxy``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as mqtt

from reconciler.broker import Broker
from schemas.messages import (
    ArtifactOffer,
    ArtifactRequest,
    DecodeError,
    chunk_count,
    decode,
    sha256_digest,
)
from schemas.topics import Namespace

log = logging.getLogger(__name__)

Lookup = Callable[[str], bytes | None]


class ArtifactServer:
    """Answers ``ArtifactRequest`` messages on one namespace until stopped."""

    def __init__(self, broker: Broker, namespace: Namespace, lookup: Lookup) -> None:
        self._broker = broker
        self._ns = namespace
        self._lookup = lookup
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._verified: set[str] = set()
        self._thread = threading.Thread(target=self._serve, name="artifact-server", daemon=True)
        self.served: dict[str, set[str]] = {}
        self.chunks_sent = 0

    def start(self) -> None:
        self._thread.start()
        self._broker.subscribe(
            self._ns.artifact_request(), lambda _t, payload, _r: self._requests.put(payload), qos=1
        )

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(5)

    def __enter__(self) -> ArtifactServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while (payload := self._requests.get()) is not None:
            try:
                self._answer(decode(ArtifactRequest, payload))
            except DecodeError as exc:
                log.warning("dropped artifact request: %s", exc)

    def _answer(self, request: ArtifactRequest) -> None:
        content = self._lookup(request.digest)
        if content is None:
            return
        if request.digest not in self._verified:
            if sha256_digest(content) != request.digest:
                log.error("refusing to serve %s: content does not match", request.digest)
                return
            self._verified.add(request.digest)
        self.chunks_sent += publish_artifact(self._broker, self._ns, request, content)
        self.served.setdefault(request.digest, set()).add(request.proplet)


class PublishStalled(Exception):
    """The broker did not acknowledge chunks in time (e.g. the connection dropped)."""


def publish_refusal(broker: Broker, ns: Namespace, request: ArtifactRequest, error: str) -> None:
    """Tell the requester the artifact cannot be provided, and why."""
    offer = ArtifactOffer(
        digest=request.digest, size=0, chunk_size=request.chunk_size, chunks=0, error=error[:1024]
    )
    hex_digest = request.digest.removeprefix("sha256:")
    broker.publish(ns.artifact_offer(request.proplet, hex_digest), offer.encode())


def publish_artifact(
    broker: Broker,
    ns: Namespace,
    request: ArtifactRequest,
    content: bytes,
    *,
    window_bytes: int | None = None,
    ack_timeout: float = 30.0,
) -> int:
    """Publish the offer, then the requested chunks of verified ``content``; returns the count.

    Chunks go out at QoS 1 without waiting for each acknowledgement: paho keeps them in order and
    ``max_inflight_messages`` bounds what is on the wire. With ``window_bytes`` it waits for the
    oldest acknowledgements whenever more than that many bytes are queued, so a large artifact
    does not sit in paho's queue in full once per request; ``PublishStalled`` when they do not
    come within ``ack_timeout``.
    """
    hex_digest = request.digest.removeprefix("sha256:")
    size = len(content)
    count = chunk_count(size, request.chunk_size)
    offer = ArtifactOffer(
        digest=request.digest, size=size, chunk_size=request.chunk_size, chunks=count
    )
    broker.publish(ns.artifact_offer(request.proplet, hex_digest), offer.encode())
    indices = request.chunks if request.chunks is not None else range(count)
    pending: deque[tuple[mqtt.MQTTMessageInfo, int]] = deque()
    queued = 0
    sent = 0
    for index in indices:
        if index >= count:
            continue
        start = index * request.chunk_size
        chunk = content[start : start + request.chunk_size]
        info = broker.publish(ns.artifact_chunk(request.proplet, hex_digest, index), chunk)
        sent += 1
        if window_bytes is None:
            continue
        pending.append((info, len(chunk)))
        queued += len(chunk)
        while queued > window_bytes:
            oldest, length = pending.popleft()
            _wait_acknowledged(oldest, ack_timeout)
            queued -= length
    return sent


def _wait_acknowledged(info: mqtt.MQTTMessageInfo, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:  # paho: not queued, or the connection is gone
        raise PublishStalled(f"chunk not sent: {exc}") from None
    if not info.is_published():
        raise PublishStalled(f"chunk not acknowledged within {timeout:g} s")
