"""The proplet's artifact store: Wasm modules and other blobs on disk, addressed by sha256.

Files live at `root/sha256/<hex>`. Every read and write goes through `ArtifactStore`, so a
byte-bounded eviction policy can later be added in one place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class DigestMismatch(ValueError):
    """The bytes offered for a digest do not hash to it."""


def sha256_digest(data: bytes) -> str:
    """The digest of `data` in the form `sha256:<64 lowercase hex>`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex part of a `sha256:<hex>` digest; ValueError for anything else."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ValueError(f"not a sha256 digest: {digest!r} (expected 'sha256:' and 64 hex digits)")
    return match.group(1)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it, on disk."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArtifactStore:
    """Content-addressed files under `root/sha256/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir = root / "sha256"

    def path(self, digest: str) -> Path:
        return self._dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, digest: str, data: bytes) -> Path:
        """Store `data` under `digest` after checking that it hashes to it; returns the path.

        The file appears atomically: readers see either nothing or the whole artifact.
        """
        target = self.path(digest)
        actual = sha256_digest(data)
        if actual != digest:
            raise DigestMismatch(f"expected {digest}, got {actual} ({len(data)} bytes)")
        self._dir.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data)
        log.debug("stored %s (%d bytes)", digest, len(data))
        return target
