"""The proplet's artifact store: Wasm modules and other blobs on disk, addressed by sha256.

Files live at `root/sha256/<hex>`; precompiled copies of a module, written by the runtime, at
`root/compiled/<hex>.*.cwasm`. Every read and write of an artifact goes through `ArtifactStore`,
which keeps the artifacts within a byte bound by evicting the least recently used ones.

Recency is the file's mtime, set explicitly on every use (read, put, touch), so the order
survives a restart: a new store scans the directory and carries on. An artifact that a running
or pending task needs is never evicted (the owner says which through ``pinned``); when those
alone exceed the bound the store stays over it and says so. The bound counts the modules only:
precompiled copies are derived data, removed together with their module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path

from schemas.messages import sha256_digest

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
# Temp files of writes that a crash interrupted; removed when a store opens the directory.
TEMP_PREFIX = ".tmp-"
COMPILED_DIR = "compiled"
_READ_CHUNK = 1024 * 1024


class DigestMismatch(ValueError):
    """The bytes offered for a digest do not hash to it."""


def digest_hex(digest: str) -> str:
    """The hex part of a `sha256:<hex>` digest; ValueError for anything else."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ValueError(f"not a sha256 digest: {digest!r} (expected 'sha256:' and 64 hex digits)")
    return match.group(1)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it, on disk."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: Path) -> tuple[str, int]:
    """The ``sha256:`` digest and size of a file, read in 1 MiB pieces."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


@dataclass(slots=True)
class _Entry:
    size: int
    used: float  # seconds since the epoch; mirrored in the file's mtime


def _nothing_pinned() -> Set[str]:
    return frozenset()


class ArtifactStore:
    """Content-addressed files under `root/sha256/`, at most ``max_bytes`` of them (LRU).

    ``max_bytes=None`` means unbounded. ``pinned`` returns the digests that must stay (those of
    running and pending tasks); it is called on the thread that stores an artifact. ``clock``
    gives the recency stamps (seconds since the epoch). Safe to use from several threads.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int | None = None,
        pinned: Callable[[], Set[str]] = _nothing_pinned,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self.compiled_dir = root / COMPILED_DIR
        self._dir = root / "sha256"
        self._pinned = pinned
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._scan()

    # -- lookups -------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        return self._dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    @property
    def used_bytes(self) -> int:
        """Bytes of the artifacts held now (precompiled copies not counted)."""
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def digests(self) -> list[str]:
        """The artifacts held, least recently used first."""
        with self._lock:
            return [d for d, _ in sorted(self._entries.items(), key=lambda item: item[1].used)]

    def staging_dir(self) -> Path:
        """Where to write a download before ``put_file``: same filesystem, cleaned on open."""
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    # -- use -----------------------------------------------------------------------------

    def read(self, digest: str) -> bytes | None:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            self._forget(digest)
            return None
        self.touch(digest)
        return data

    def touch(self, digest: str) -> bool:
        """Mark ``digest`` as used now; False if it is not held."""
        path = self.path(digest)
        now = self._clock()
        try:
            os.utime(path, (now, now))
            size = path.stat().st_size
        except FileNotFoundError:
            self._forget(digest)
            return False
        with self._lock:
            self._entries.pop(digest, None)  # re-inserted last: ties in `used` keep use order
            self._entries[digest] = _Entry(size, now)
        return True

    def put(self, digest: str, data: bytes) -> Path:
        """Store `data` under `digest` after checking that it hashes to it; returns the path.

        The file appears atomically: readers see either nothing or the whole artifact. Older
        artifacts are evicted to keep within the bound (never this one, never a pinned one).
        """
        target = self.path(digest)
        actual = sha256_digest(data)
        if actual != digest:
            raise DigestMismatch(f"expected {digest}, got {actual} ({len(data)} bytes)")
        if not self.touch(digest):
            self._dir.mkdir(parents=True, exist_ok=True)
            write_atomically(target, data)
            self.touch(digest)
            log.debug("stored %s (%d bytes)", digest, len(data))
        self.trim(keep=digest)
        return target

    def put_file(self, digest: str, source: Path) -> Path:
        """Move the file ``source`` in as ``digest`` after checking its sha256; returns the path.

        ``source`` must be on the store's filesystem (see ``staging_dir``); it is gone afterwards,
        whether it was stored or refused.
        """
        target = self.path(digest)
        try:
            actual, size = file_digest(source)
            if actual != digest:
                raise DigestMismatch(f"expected {digest}, got {actual} ({size} bytes)")
            self._dir.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        finally:
            source.unlink(missing_ok=True)
        self.touch(digest)
        log.debug("stored %s (%d bytes)", digest, size)
        self.trim(keep=digest)
        return target

    def trim(self, keep: str | None = None) -> list[str]:
        """Evict least recently used artifacts until within the bound; returns the evicted.

        Pinned digests and ``keep`` stay, even if that leaves the store over its bound.
        """
        if self.max_bytes is None:
            return []
        with self._lock:
            total = sum(e.size for e in self._entries.values())
        if total <= self.max_bytes:
            return []
        pinned = set(self._pinned())
        if keep is not None:
            pinned.add(keep)
        evicted = []
        for digest in self.digests():
            if total <= self.max_bytes:
                break
            if digest in pinned:
                continue
            with self._lock:
                entry = self._entries.pop(digest, None)
            if entry is None:
                continue
            self._remove_files(digest)
            total -= entry.size
            evicted.append(digest)
            log.info("evicted %s (%d bytes, least recently used)", digest, entry.size)
        if total > self.max_bytes:
            log.warning(
                "artifact cache holds %d bytes, over its bound of %d: the rest is in use by tasks",
                total,
                self.max_bytes,
            )
        return evicted

    # -- internals -----------------------------------------------------------------------

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)

    def _remove_files(self, digest: str) -> None:
        hex_ = digest_hex(digest)
        (self._dir / hex_).unlink(missing_ok=True)
        if self.compiled_dir.is_dir():
            for compiled in self.compiled_dir.glob(f"{hex_}.*.cwasm"):
                compiled.unlink(missing_ok=True)

    def _scan(self) -> None:
        """Index what an earlier run left: sizes and recency from the files themselves."""
        try:
            files = list(self._dir.iterdir())
        except FileNotFoundError:
            return
        for file in files:
            try:
                if file.name.startswith(TEMP_PREFIX):
                    file.unlink(missing_ok=True)
                elif _HEX.fullmatch(file.name) and file.is_file():
                    stat = file.stat()
                    self._entries["sha256:" + file.name] = _Entry(stat.st_size, stat.st_mtime)
            except OSError as exc:  # one unreadable entry must not stop the agent
                log.warning("ignoring %s in the artifact cache: %s", file, exc)
        if self._entries:
            log.info("artifact cache: %d artifacts, %d bytes", len(self._entries), self.used_bytes)
