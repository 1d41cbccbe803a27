"""Chunked artifact transfer, requester side: resume and retry decisions.

``Transfers`` tracks every artifact this agent waits for (its chunks in a
``schemas.chunks.Assembly``) and decides when to ask again; it does no IO itself, it returns the
requests to publish, so it is tested without a broker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from schemas.chunks import Assembly
from schemas.messages import ArtifactOffer, ArtifactRequest, chunk_count

log = logging.getLogger(__name__)

# Ask for at most this many chunks at once: brokers cap the QoS 1 messages they queue for one
# client (Mosquitto: 1,000 by default) and silently drop the rest, so a large artifact in small
# chunks arrives window by window. It also keeps resume requests small.
WINDOW = 512


@dataclass(slots=True)
class Wanted:
    """An artifact this agent waits for."""

    digest: str
    image: str | None
    attempt: int = 0
    next_try: float = 0.0
    assembly: Assembly | None = None
    error: str | None = None
    progress_at: float = 0.0
    failures: list[str] = field(default_factory=list)
    size: int | None = None  # known from the desired task: lets the first request be windowed
    requested: set[int] | None = None  # indices of the window asked for and not yet received


@dataclass(frozen=True, slots=True)
class Timing:
    """How long to wait for progress before asking again, and the backoff between attempts."""

    stall: float = 1.0
    initial: float = 0.5
    # Capped low: a proplet that came back waits for whichever pass serves its module next.
    maximum: float = 5.0

    def backoff(self, attempt: int) -> float:
        return float(min(self.maximum, self.initial * (2 ** max(0, attempt - 1))))


class Transfers:
    """Every artifact in flight for one requester."""

    def __init__(self, proplet: str, chunk_size: int, timing: Timing | None = None) -> None:
        self.proplet = proplet
        self.chunk_size = chunk_size
        self.timing = timing or Timing()
        self._wanted: dict[str, Wanted] = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self._wanted

    def waiting(self, digest: str) -> Wanted | None:
        return self._wanted.get(digest)

    def want(
        self, digest: str, image: str | None, now: float, size: int | None = None
    ) -> ArtifactRequest | None:
        """Start fetching ``digest`` unless already in flight; returns the request to send."""
        if digest in self._wanted:
            return None
        wanted = Wanted(digest, image, size=size)
        self._wanted[digest] = wanted
        return self._ask(wanted, now, resume=False)

    def drop(self, digest: str) -> None:
        self._wanted.pop(digest, None)

    def on_offer(self, offer: ArtifactOffer, now: float) -> str | None:
        """Record an offer; returns an error text when the server cannot provide the artifact."""
        wanted = self._wanted.get(offer.digest)
        if wanted is None:
            return None
        if offer.error is not None:
            wanted.error = offer.error
            wanted.assembly = None
            wanted.next_try = now + self.timing.backoff(wanted.attempt + 1)
            return offer.error
        current = wanted.assembly
        if current is None or (current.size, current.chunk_size) != (offer.size, offer.chunk_size):
            wanted.assembly = Assembly(offer.digest, offer.size, offer.chunk_size)
        wanted.error = None
        wanted.progress_at = now
        return None

    def on_chunk(self, digest: str, index: int, data: bytes, now: float) -> bytes | None:
        """Add a chunk; returns the verified content once complete.

        A complete artifact whose digest does not match is thrown away and fetched again from
        the start on the next ``due`` call.
        """
        wanted = self._wanted.get(digest)
        if wanted is None or wanted.assembly is None:
            return None
        if not wanted.assembly.add(index, data):
            log.warning(
                "dropped chunk %d of %s: wrong index or length (%d bytes)", index, digest, len(data)
            )
            return None
        wanted.progress_at = now
        wanted.attempt = 0
        if not wanted.assembly.complete:
            if wanted.requested is not None:
                wanted.requested.discard(index)
                if not wanted.requested:
                    # This window is in: the next request goes out on the next ``due``.
                    wanted.next_try = now
                    wanted.progress_at = now - self.timing.stall
            return None
        content = wanted.assembly.verified()
        if content is None:
            reason = f"content of {digest} does not match its digest; fetching again"
            log.warning("%s", reason)
            wanted.failures.append(reason)
            wanted.assembly = None
            wanted.next_try = now + self.timing.backoff(wanted.attempt)
            return None
        del self._wanted[digest]
        return content

    def due(self, now: float) -> list[ArtifactRequest]:
        """Requests to send now: retries after errors, resumes after a stall."""
        requests = []
        for wanted in self._wanted.values():
            if wanted.assembly is not None:
                if now - wanted.progress_at >= self.timing.stall and now >= wanted.next_try:
                    requests.append(self._ask(wanted, now, resume=True))
            elif now >= wanted.next_try:
                requests.append(self._ask(wanted, now, resume=False))
        return requests

    def resend(self, now: float) -> list[ArtifactRequest]:
        """Ask again for everything in flight, e.g. after a reconnect lost the replies."""
        return [self._ask(w, now, resume=w.assembly is not None) for w in self._wanted.values()]

    def next_deadline(self) -> float | None:
        times = [
            max(w.progress_at + self.timing.stall, w.next_try)
            if w.assembly is not None
            else w.next_try
            for w in self._wanted.values()
        ]
        return min(times) if times else None

    def _ask(self, wanted: Wanted, now: float, *, resume: bool) -> ArtifactRequest:
        wanted.attempt += 1
        wanted.next_try = now + self.timing.backoff(wanted.attempt)
        chunks: list[int] | None = None
        chunk_size = self.chunk_size
        if resume and wanted.assembly is not None:
            chunks = wanted.assembly.missing()[:WINDOW]
            chunk_size = wanted.assembly.chunk_size
            wanted.progress_at = now
        elif wanted.size is not None and chunk_count(wanted.size, chunk_size) > WINDOW:
            chunks = list(range(WINDOW))
        wanted.requested = set(chunks) if chunks is not None else None
        return ArtifactRequest(
            proplet=self.proplet,
            digest=wanted.digest,
            chunk_size=chunk_size,
            chunks=chunks,
            image=wanted.image,
        )
