"""Reassembling a chunked artifact: the protocol's rules for which chunk fits where, and the
digest check. Pure: the agent's module and input transfers and the coordinator's uploads both
reassemble with it.
"""

from __future__ import annotations

import hashlib

from schemas.messages import chunk_count


class Assembly:
    """One artifact being reassembled from chunks of ``chunk_size`` bytes, in any order."""

    def __init__(self, digest: str, size: int, chunk_size: int) -> None:
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.count = chunk_count(size, chunk_size)
        self._chunks: dict[int, bytes] = {}
        # Chunks usually arrive in order: hash the contiguous prefix as it grows, so little
        # hashing is left once the last chunk is in (hashlib releases the GIL meanwhile).
        self._hasher = hashlib.sha256()
        self._hashed = 0  # chunks [0, _hashed) are in the hasher

    def expected_length(self, index: int) -> int:
        if index == self.count - 1:
            return self.size - index * self.chunk_size
        return self.chunk_size

    def add(self, index: int, data: bytes) -> bool:
        """Keep a chunk if it fits; a chunk of the wrong length or index is refused.

        A duplicate (QoS 1 may deliver twice) is accepted and the first copy kept.
        """
        if not 0 <= index < self.count or len(data) != self.expected_length(index):
            return False
        if index < self._hashed or index in self._chunks:
            return True
        self._chunks[index] = data
        while self._hashed in self._chunks:
            self._hasher.update(self._chunks[self._hashed])
            self._hashed += 1
        return True

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self._chunks]

    @property
    def complete(self) -> bool:
        return len(self._chunks) == self.count

    def actual_digest(self) -> str:
        """The sha256 of the complete content, whatever the digest it should have."""
        if not self.complete:
            raise ValueError("the artifact is not complete")
        return "sha256:" + self._hasher.hexdigest()

    def verified(self) -> bytes | None:
        """The whole content if it is complete and its sha256 matches the digest, else None."""
        if not self.complete or self.actual_digest() != self.digest:
            return None
        return b"".join(self._chunks[i] for i in range(self.count))
