"""Receiving the files that proplets' runs wrote under ``/out``: reassembly and verification.

A proplet pushes each output as an ``ArtifactOffer`` on ``proplets/{id}/uploads/{hex}/offer``
followed by raw chunks on ``proplets/{id}/uploads/{hex}/{index}``, then publishes the run's
result. ``Uploads`` reassembles every (proplet, digest) from its offer and chunks, in whatever
order they come, refuses a chunk whose length does not fit its index, and keeps an upload only
once its sha256 matches. Completed uploads stay in memory, within a byte bound, oldest dropped
first, until a reader takes them (``get``, ``wait``) and lets them go (``discard``).

Messages arrive on the broker's network thread: the work done there is copying a chunk into
its place and hashing. The final check of an upload and the ``on_complete`` callback run
outside the lock that readers wait on. A malformed message is logged and dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from reconciler.broker import Handler
from schemas.chunks import Assembly
from schemas.messages import (
    MAX_CHUNK_SIZE,
    ArtifactOffer,
    DecodeError,
    chunk_count,
    decode,
)
from schemas.topics import Kind, Namespace, TopicError

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (proplet, digest)
OnComplete = Callable[[str, str], None]

DEFAULT_MAX_BYTES = 1024**3
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024**2
# An upload that has not progressed for this long is given up (its proplet went away).
DEFAULT_STALL_SECONDS = 300.0


class Subscriber(Protocol):
    """What ``attach`` needs from a connection (``reconciler.broker.Broker``)."""

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None: ...


@dataclass(slots=True)
class _Partial:
    """One upload being reassembled. Chunks that come before the offer wait in ``early``."""

    touched: float
    assembly: Assembly | None = None  # from the offer on
    early: dict[int, bytes] = field(default_factory=dict)
    early_bytes: int = 0

    @property
    def held(self) -> int:
        """Bytes of memory this upload holds, counting an offered upload at its full size."""
        return (self.assembly.size if self.assembly is not None else 0) + self.early_bytes


class Uploads:
    """Every upload of one namespace: those in progress and the completed ones, by key.

    ``max_bytes`` bounds the completed uploads kept (the oldest go first) and, separately,
    the uploads in progress; ``max_upload_bytes`` bounds one upload, larger offers are
    refused. ``on_complete(proplet, digest)`` is called on the broker's network thread when an
    upload is complete and verified; it must only hand over (set an event, put on a queue).
    """

    def __init__(
        self,
        namespace: Namespace,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
        on_complete: OnComplete | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_upload_bytes > max_bytes:
            raise ValueError(
                f"max_upload_bytes ({max_upload_bytes}) must not exceed max_bytes ({max_bytes})"
            )
        self.ns = namespace
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes
        self.stall_seconds = stall_seconds
        self.on_complete = on_complete
        self._clock = clock
        self._cond = threading.Condition()
        self._complete: OrderedDict[Key, bytes] = OrderedDict()
        self._partials: dict[Key, _Partial] = {}
        self.dropped = 0  # messages refused: malformed, unfitting, over a bound, or mismatched

    def attach(self, broker: Subscriber) -> None:
        """Subscribe to every proplet's uploads (QoS 1: a lost chunk would lose the file)."""
        broker.subscribe(self.ns.fleet_uploads(), self._on_message, qos=1)

    # -- readers ---------------------------------------------------------------------------

    def get(self, proplet: str, digest: str) -> bytes | None:
        """The verified content of a completed upload, or None."""
        with self._cond:
            return self._complete.get((proplet, digest))

    def wait(self, proplet: str, digest: str, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` seconds for the upload to complete; None if it did not."""
        key = (proplet, digest)
        with self._cond:
            self._cond.wait_for(lambda: key in self._complete, timeout=max(0.0, timeout))
            return self._complete.get(key)

    def discard(self, proplet: str, digest: str) -> None:
        """Forget the upload, complete or in progress; a later offer starts it afresh."""
        with self._cond:
            self._complete.pop((proplet, digest), None)
            self._partials.pop((proplet, digest), None)

    @property
    def completed_bytes(self) -> int:
        with self._cond:
            return sum(len(data) for data in self._complete.values())

    def in_progress(self) -> list[Key]:
        with self._cond:
            return sorted(self._partials)

    # -- the network thread ----------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        try:
            parsed = self.ns.parse(topic)
        except TopicError as exc:
            self._drop(topic, str(exc))
            return
        key = (parsed.proplet, "sha256:" + parsed.digest_hex)
        if parsed.kind is Kind.UPLOAD_OFFER:
            try:
                offer = decode(ArtifactOffer, payload)
            except DecodeError as exc:
                self._drop(topic, str(exc))
                return
            finished = self._on_offer(topic, key, offer)
        elif parsed.kind is Kind.UPLOAD_CHUNK:
            finished = self._on_chunk(topic, key, parsed.index, payload)
        else:
            return
        if finished is not None:
            self._finish(key, finished)

    def _on_offer(self, topic: str, key: Key, offer: ArtifactOffer) -> _Partial | None:
        if offer.digest != key[1]:
            self._drop(topic, "offer digest does not match its topic")
            return None
        if offer.error is not None:
            self._drop(topic, f"an upload offer carries an error: {offer.error}")
            return None
        if offer.chunks != chunk_count(offer.size, offer.chunk_size):
            self._drop(topic, f"{offer.chunks} chunks cannot hold {offer.size} bytes")
            return None
        if offer.size > self.max_upload_bytes:
            self._drop(topic, f"{offer.size} bytes exceeds the bound of {self.max_upload_bytes}")
            return None
        with self._cond:
            now = self._clock()
            self._expire(now)
            if key in self._complete:
                return None  # already have it: the same digest is the same content
            partial = self._partials.get(key)
            if partial is not None and partial.assembly is not None:
                held = partial.assembly
                if (held.size, held.chunk_size) == (offer.size, offer.chunk_size):
                    partial.touched = now
                    return None  # the same offer again (a resend)
                partial = None  # chunked differently: start over
            early = partial.early if partial is not None else {}
            assembly = Assembly(offer.digest, offer.size, offer.chunk_size)
            partial = _Partial(touched=now, assembly=assembly)
            self._partials[key] = partial
            for index, data in sorted(early.items()):
                if not assembly.add(index, data):
                    self.dropped += 1
                    log.warning(
                        "dropped chunk %d of %s from %s: does not fit", index, key[1], key[0]
                    )
            self._bound_partials(keep=key)
            if assembly.complete:
                del self._partials[key]
                return partial
            return None

    def _on_chunk(self, topic: str, key: Key, index: int, data: bytes) -> _Partial | None:
        with self._cond:
            now = self._clock()
            if key in self._complete:
                return None  # a late duplicate
            partial = self._partials.get(key)
            if partial is None or partial.assembly is None:
                # Before its offer: keep it for when the offer comes, within the bounds.
                if partial is None:
                    partial = self._partials[key] = _Partial(touched=now)
                if len(data) > MAX_CHUNK_SIZE or partial.held + len(data) > self.max_upload_bytes:
                    self._drop(topic, f"chunk {index} before its offer does not fit the bound")
                    return None
                if index not in partial.early:
                    partial.early[index] = data
                    partial.early_bytes += len(data)
                partial.touched = now
                self._bound_partials(keep=key)
                return None
            assembly = partial.assembly
            if not assembly.add(index, data):
                self._drop(
                    topic,
                    f"chunk {index} of {len(data)} bytes does not fit an upload of"
                    f" {assembly.size} bytes in chunks of {assembly.chunk_size}",
                )
                return None
            partial.touched = now
            if not assembly.complete:
                return None
            del self._partials[key]
            return partial

    def _finish(self, key: Key, partial: _Partial) -> None:
        """Verify a complete upload (outside the lock) and keep it; then tell the owner."""
        assembly = partial.assembly
        assert assembly is not None  # only complete uploads are finished
        content = assembly.verified()
        if content is None:
            actual = assembly.actual_digest()
            with self._cond:
                self.dropped += 1
            log.warning(
                "upload %s from %s refused: its content hashes to %s", key[1], key[0], actual
            )
            return
        with self._cond:
            self._complete[key] = content
            self._complete.move_to_end(key)
            total = sum(len(data) for data in self._complete.values())
            while total > self.max_bytes and len(self._complete) > 1:
                old_key, old = self._complete.popitem(last=False)
                total -= len(old)
                log.warning(
                    "dropped upload %s from %s (%d bytes): over the bound of %d bytes",
                    old_key[1],
                    old_key[0],
                    len(old),
                    self.max_bytes,
                )
            self._cond.notify_all()
        log.info("upload %s from %s complete (%d bytes)", key[1], key[0], len(content))
        if self.on_complete is not None:
            try:
                self.on_complete(*key)
            except Exception:
                log.exception("on_complete for %s from %s failed", key[1], key[0])

    def _bound_partials(self, keep: Key) -> None:
        """Keep the uploads in progress within ``max_bytes``: give up the oldest first."""
        total = sum(p.held for p in self._partials.values())
        for key, partial in sorted(self._partials.items(), key=lambda item: item[1].touched):
            if total <= self.max_bytes:
                return
            if key == keep:
                continue
            del self._partials[key]
            total -= partial.held
            self.dropped += 1
            log.warning("gave up upload %s from %s: too many uploads in progress", key[1], key[0])

    def _expire(self, now: float) -> None:
        for key, partial in list(self._partials.items()):
            if now - partial.touched >= self.stall_seconds:
                del self._partials[key]
                log.warning(
                    "gave up upload %s from %s: no progress for %.0f s",
                    key[1],
                    key[0],
                    now - partial.touched,
                )

    def _drop(self, topic: str, reason: str) -> None:
        with self._cond:
            self.dropped += 1
        log.warning("dropped upload message on %s: %s", topic, reason)
