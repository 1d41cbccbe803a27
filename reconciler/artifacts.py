"""Serving artifacts to proplets over the chunked transfer: offer, then the requested chunks.

The server answers only for digests its ``lookup`` knows (another server may hold the rest), and
verifies the content against the digest before the first chunk leaves.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable

from reconciler.broker import Broker
from schemas.messages import ArtifactOffer, ArtifactRequest, DecodeError, chunk_count, decode
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
            if "sha256:" + hashlib.sha256(content).hexdigest() != request.digest:
                log.error("refusing to serve %s: content does not match", request.digest)
                return
            self._verified.add(request.digest)
        hex_digest = request.digest.removeprefix("sha256:")
        size = len(content)
        count = chunk_count(size, request.chunk_size)
        offer = ArtifactOffer(
            digest=request.digest, size=size, chunk_size=request.chunk_size, chunks=count
        )
        self._broker.publish(self._ns.artifact_offer(request.proplet, hex_digest), offer.encode())
        indices = request.chunks if request.chunks is not None else range(count)
        for index in indices:
            if index >= count:
                continue
            start = index * request.chunk_size
            self._broker.publish(
                self._ns.artifact_chunk(request.proplet, hex_digest, index),
                content[start : start + request.chunk_size],
            )
            self.chunks_sent += 1
        self.served.setdefault(request.digest, set()).add(request.proplet)
