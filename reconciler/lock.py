"""One pass at a time per fleet on this host: terminal, cron and serve passes take turns.

An advisory ``flock`` on a file named after the broker, domain and channel. The holder writes its
pid into the file so a waiting pass can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeout(Exception):
    """Another pass held the fleet lock for longer than we were willing to wait."""


def lock_path(cache_dir: Path, fleet_key: str) -> Path:
    digest = hashlib.sha256(fleet_key.encode()).hexdigest()[:16]
    return cache_dir / "locks" / f"{digest}.lock"


@contextmanager
def fleet_lock(
    path: Path,
    *,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    poll: float = 0.05,
) -> Iterator[None]:
    """Hold the lock at ``path``; waits for the current holder (forever without ``timeout``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    on_wait(f"another pass on this fleet is running (pid {holder}); waiting")
                    told = True
                if timeout is not None and time.monotonic() - started > timeout:
                    raise LockTimeout(
                        f"the fleet lock {path} was held for over {timeout}s"
                    ) from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
