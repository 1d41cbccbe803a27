"""The registry proxy: answers artifact requests naming an OCI image by pulling from its registry.

A proplet (or a board) that needs a module kept in an OCI registry publishes an
``ArtifactRequest`` whose ``image`` is the reference and whose ``digest`` is the Wasm layer's
digest. ``RegistryProxy`` pulls that blob from the reference's repository (a tag or a digest
reference alike: the blob digest is what is fetched), checks its sha256 before the first chunk
leaves, and answers like the reconciler's artifact server: an ``ArtifactOffer``, then the chunks
asked for, at the requester's chunk size. Requests without ``image`` are the reconciler's (modules
stored in Git): the proxy stays silent.

- Pulls run on a worker pool, so a slow registry does not hold up requests served from the cache.
- Recently pulled blobs stay in a byte-bounded LRU (``BlobCache``): a resume, or another proplet
  asking for the same module, is served without pulling again.
- Requests for a blob of a repository while it is being pulled share that one pull (single
  flight), and a request identical to one still being answered (a requester asking again while
  it waits) is dropped rather than answered twice.
- A failure is answered with an offer whose ``error`` is the registry's reason (``not found: ...``,
  ``registry refused the credentials ...``, ``registry unreachable: ...``, ``digest mismatch:
  ...``); the requester reports it and asks again with backoff. Failures are not cached.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from reconciler.artifacts import PublishStalled, publish_artifact, publish_refusal
from reconciler.broker import Broker
from reconciler.registry import (
    ArtifactNotFound,
    CredentialsRefused,
    InvalidReference,
    RegistryClient,
    RegistryError,
    RegistryUnreachable,
    parse_reference,
)
from schemas.messages import ArtifactRequest, DecodeError, decode
from schemas.topics import Namespace

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BLOB_BYTES = 1024 * 1024 * 1024
DEFAULT_WORKERS = 8
# Bytes of one answer that may wait in paho's queue: enough to keep the broker busy (the
# in-flight window is 64 messages), small enough that many answers at once stay cheap.
DEFAULT_WINDOW_BYTES = 16 * 1024 * 1024
_PULL_PART = 1024 * 1024  # read size from the registry: fewer Python-level iterations


class PullFailed(Exception):
    """A blob could not be provided; the message is what the requester is told."""


class BlobCache:
    """Verified blobs by digest, least recently used first out, at most ``capacity`` bytes.

    A blob larger than the whole capacity is not kept. Thread-safe.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("cache capacity must not be negative")
        self.capacity = capacity
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is not None:
                self._blobs.move_to_end(digest)
            return blob

    def put(self, digest: str, blob: bytes) -> None:
        with self._lock:
            if digest in self._blobs:
                self._blobs.move_to_end(digest)
                return
            if len(blob) > self.capacity:
                return
            self._blobs[digest] = blob
            self._size += len(blob)
            while self._size > self.capacity:
                _, evicted = self._blobs.popitem(last=False)
                self._size -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._size = 0

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._blobs

    def __len__(self) -> int:
        with self._lock:
            return len(self._blobs)

    @property
    def size(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._size


@dataclass(slots=True)
class ProxyStats:
    """Counters since start; read them for logs, tests and benchmarks."""

    requests: int = 0  # decoded requests that name an image
    ignored: int = 0  # requests without an image (not ours) or malformed
    duplicates: int = 0  # identical to a request still being answered: dropped
    pulls: int = 0  # blob downloads started
    joined: int = 0  # requests that waited on another request's pull
    cache_hits: int = 0
    offers: int = 0  # answered with content
    refusals: int = 0  # answered with an error
    chunks_sent: int = 0
    bytes_pulled: int = 0


class RegistryProxy:
    """Answers ``ArtifactRequest`` messages that carry an ``image``, until stopped."""

    def __init__(
        self,
        broker: Broker,
        namespace: Namespace,
        client: RegistryClient,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        workers: int = DEFAULT_WORKERS,
        window_bytes: int | None = DEFAULT_WINDOW_BYTES,
    ) -> None:
        self._broker = broker
        self._ns = namespace
        self._client = client
        self.cache = BlobCache(cache_bytes)
        self.max_blob_bytes = max_blob_bytes
        self.window_bytes = window_bytes
        self.stats = ProxyStats()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="registry-proxy")
        self._lock = threading.Lock()
        self._flights: dict[tuple[str, str], Future[bytes]] = {}
        self._answering: set[Hashable] = set()
        self._stopped = False

    def start(self) -> None:
        self._broker.subscribe(self._ns.artifact_request(), self._on_request, qos=1)

    def stop(self, wait: bool = True) -> None:
        """Take no new requests; with ``wait``, let the answers in progress finish."""
        with self._lock:
            self._stopped = True
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _on_request(self, _topic: str, payload: bytes, _retained: bool) -> None:
        # paho's network thread: hand over only.
        with self._lock:
            if self._stopped:
                return
            self._pool.submit(self._handle, payload)

    # -- one request (a worker thread) -----------------------------------------------------

    def _handle(self, payload: bytes) -> None:
        try:
            request = decode(ArtifactRequest, payload)
        except DecodeError as exc:
            log.warning("dropped artifact request: %s", exc)
            request = None
        if request is None or request.image is None:
            # Without an image it names a module stored in Git: the reconciler serves it.
            with self._lock:
                self.stats.ignored += 1
            return
        key = (
            request.proplet,
            request.digest,
            request.image,
            request.chunk_size,
            tuple(request.chunks) if request.chunks is not None else None,
        )
        with self._lock:
            self.stats.requests += 1
            if key in self._answering:
                self.stats.duplicates += 1
                log.debug("%s asked again for %s while being answered", *key[:2])
                return
            self._answering.add(key)
        try:
            self._answer(request, request.image)
        except Exception:
            log.exception("answering %s for %s failed", request.digest, request.proplet)
        finally:
            with self._lock:
                self._answering.discard(key)

    def _answer(self, request: ArtifactRequest, image: str) -> None:
        try:
            content = self._blob(image, request.digest)
        except PullFailed as exc:
            log.warning("cannot provide %s (%s) to %s: %s", request.digest, image,
                        request.proplet, exc)  # fmt: skip
            with self._lock:
                self.stats.refusals += 1
            publish_refusal(self._broker, self._ns, request, str(exc))
            return
        try:
            sent = publish_artifact(
                self._broker, self._ns, request, content, window_bytes=self.window_bytes
            )
        except PublishStalled as exc:
            # The requester notices the stall and asks again for what it misses.
            log.warning("gave up sending %s to %s: %s", request.digest, request.proplet, exc)
            return
        with self._lock:
            self.stats.offers += 1
            self.stats.chunks_sent += sent
        log.info("sent %d chunk(s) of %s to %s", sent, request.digest, request.proplet)

    def _blob(self, image: str, digest: str) -> bytes:
        """The verified blob: from the cache, from a pull in progress, or pulled now."""
        try:
            ref = parse_reference(image)
        except InvalidReference as exc:
            raise PullFailed(str(exc)) from None
        key = (ref.name, digest)
        with self._lock:
            cached = self.cache.get(digest)
            if cached is not None:
                self.stats.cache_hits += 1
                return cached
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
                self.stats.pulls += 1
            else:
                self.stats.joined += 1
        if not leader:
            return flight.result()  # raises the leader's PullFailed
        try:
            blob = self._pull(image, digest)
        except PullFailed as exc:
            flight.set_exception(exc)
        except Exception as exc:  # a bug, or an error oras let through: still say so
            log.exception("pull of %s from %s failed", digest, ref.name)
            flight.set_exception(PullFailed(f"pull of {digest} from {ref.name} failed: {exc}"))
        except BaseException:  # never leave the joined requests waiting
            flight.set_exception(PullFailed(f"pull of {digest} from {ref.name} interrupted"))
            raise
        else:
            self.cache.put(digest, blob)
            flight.set_result(blob)
        finally:
            with self._lock:
                self._flights.pop(key, None)
        return flight.result()

    def _pull(self, image: str, digest: str) -> bytes:
        """Download and verify one blob; every failure becomes ``PullFailed`` with its reason.

        ``iter_blob`` hashes what it streams and raises after the last part when the content does
        not match the digest, so a blob returned here has been verified.
        """
        ref = parse_reference(image)
        parts: list[bytes] = []
        size = 0
        try:
            for part in self._client.iter_blob(ref, digest, chunk_size=_PULL_PART):
                size += len(part)
                if size > self.max_blob_bytes:
                    raise PullFailed(
                        f"blob {digest} in {ref.name} is larger than the proxy's limit of"
                        f" {self.max_blob_bytes} bytes"
                    )
                parts.append(part)
        except (ArtifactNotFound, CredentialsRefused, InvalidReference) as exc:
            raise PullFailed(str(exc)) from None
        except RegistryUnreachable as exc:
            raise PullFailed(f"registry unreachable: {exc}") from None
        except RegistryError as exc:
            received = hashlib.sha256(b"".join(parts)).hexdigest()
            if "sha256:" + received != digest:
                raise PullFailed(f"digest mismatch: {exc}") from None
            raise PullFailed(str(exc)) from None
        with self._lock:
            self.stats.bytes_pulled += size
        log.info("pulled %s from %s (%d bytes)", digest, ref.name, size)
        return b"".join(parts)
