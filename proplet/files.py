"""A run's files: its inputs staged read-only at ``/in``, an empty ``/out``, and the upload of
what the run wrote there.

Each run with inputs or outputs gets a directory of its own under the agent's ``runs/`` folder,
removed after the run. Inputs are hard links to the artifact store's files (copies when the
store is on another filesystem), so staging a large model costs no copy; the guest sees them
through a read-only preopen, which also keeps it from writing through the link into the store.

Outputs are the plain files at the top of ``/out``, uploaded one by one as an offer followed by
raw chunks on ``proplets/{id}/uploads/{hex}/...``. Files are read and published chunk by chunk,
and the publisher waits for the broker's acknowledgements whenever more than a window of bytes
is in flight, so a large output never sits in memory in full.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proplet.artifacts import file_digest
from schemas.messages import (
    FILE_NAME_PATTERN,
    MAX_TASK_FILES,
    ArtifactOffer,
    ArtifactRef,
    chunk_count,
)
from schemas.topics import Namespace

log = logging.getLogger(__name__)

UPLOAD_CHUNK_SIZE = 256 * 1024
# Bytes published but not yet acknowledged by the broker before the uploader waits.
UPLOAD_WINDOW_BYTES = 8 * 1024 * 1024
ACK_TIMEOUT = 30.0
_FILE_NAME = re.compile(FILE_NAME_PATTERN)  # with fullmatch: no trailing newline slips by


class FilesError(Exception):
    """A run's files could not be staged, collected or uploaded; the text is the run's error."""


class Acknowledgement(Protocol):
    """What a publish returns (paho's ``MQTTMessageInfo``): a way to wait for the broker."""

    def wait_for_publish(self, timeout: float | None = None) -> None: ...

    def is_published(self) -> bool: ...


Publish = Callable[[str, bytes], Acknowledgement]


@dataclass(frozen=True, slots=True)
class Workspace:
    """One run's directories; ``inputs`` and ``outputs`` are None when the task has none."""

    root: Path
    inputs: Path | None
    outputs: Path | None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def clear(runs_dir: Path) -> None:
    """Remove the workspaces an earlier agent left behind (it stopped during a run)."""
    if runs_dir.is_dir():
        for leftover in runs_dir.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def stage(runs_dir: Path, key: str, inputs: Sequence[tuple[str, Path]], outputs: bool) -> Workspace:
    """Make the workspace ``runs_dir/key`` with each ``(name, source)`` of ``inputs`` in it."""
    root = runs_dir / key
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    workspace = Workspace(root, root / "in" if inputs else None, root / "out" if outputs else None)
    try:
        if workspace.inputs is not None:
            workspace.inputs.mkdir()
            for name, source in inputs:
                target = workspace.inputs / name
                if target.exists():
                    raise FilesError(f"inputs: {name} is given twice")
                _place(source, target, name)
        if workspace.outputs is not None:
            workspace.outputs.mkdir()
    except BaseException:
        workspace.remove()
        raise
    return workspace


def _place(source: Path, target: Path, name: str) -> None:
    try:
        os.link(source, target)
        return
    except FileNotFoundError:
        raise FilesError(f"input {name}: artifact vanished from the cache") from None
    except OSError:
        pass  # another filesystem, or links not allowed there: copy instead
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        raise FilesError(f"input {name}: cannot stage it: {exc}") from None


@dataclass(frozen=True, slots=True)
class OutputFile:
    name: str
    path: Path
    digest: str
    size: int

    def ref(self) -> ArtifactRef:
        return ArtifactRef(name=self.name, digest=self.digest, size=self.size)


def collect(directory: Path, limit: int) -> list[OutputFile]:
    """The plain files a run left at the top of ``directory``, hashed, sorted by name.

    Raises ``FilesError`` naming the first entry that cannot be an output (a subdirectory, a
    symbolic link, a name outside the protocol's file names), or when there are more than
    ``MAX_TASK_FILES`` files or more than ``limit`` bytes in all.
    """
    found: list[tuple[str, Path, int]] = []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            mode = entry.stat(follow_symlinks=False).st_mode
            shown = f"/out/{entry.name}" if _FILE_NAME.fullmatch(entry.name) else repr(entry.name)
            if stat.S_ISLNK(mode):
                raise FilesError(f"outputs: {shown} is a symbolic link; {_ONLY_FILES}")
            if stat.S_ISDIR(mode):
                raise FilesError(f"outputs: {shown} is a directory; {_ONLY_FILES}")
            if not stat.S_ISREG(mode):
                raise FilesError(f"outputs: {shown} is not a regular file; {_ONLY_FILES}")
            if not _FILE_NAME.fullmatch(entry.name):
                raise FilesError(
                    f"outputs: file name {shown} is not allowed: use 1-63 letters, digits, '.',"
                    " '_' or '-', starting with a letter or digit"
                )
            found.append((entry.name, Path(entry.path), entry.stat(follow_symlinks=False).st_size))
    if len(found) > MAX_TASK_FILES:
        raise FilesError(f"outputs: {len(found)} files written, the limit is {MAX_TASK_FILES}")
    total = sum(size for *_, size in found)
    if total > limit:
        raise FilesError(f"outputs: {total} bytes written, the limit is {limit}")
    return [OutputFile(name, path, *file_digest(path)) for name, path, _ in found]


_ONLY_FILES = "only plain files at the top of /out are uploaded"


def upload(
    file: OutputFile,
    namespace: Namespace,
    proplet: str,
    publish: Publish,
    *,
    chunk_size: int = UPLOAD_CHUNK_SIZE,
    window_bytes: int = UPLOAD_WINDOW_BYTES,
    ack_timeout: float = ACK_TIMEOUT,
    stopped: Callable[[], bool] = lambda: False,
) -> int:
    """Publish ``file`` as an offer and its chunks (QoS 1, in order); returns the chunk count.

    Raises ``FilesError`` when the broker does not acknowledge in time, the connection is gone,
    the file changed since it was hashed, or ``stopped`` turns true.
    """
    hex_digest = file.digest.removeprefix("sha256:")
    count = chunk_count(file.size, chunk_size)
    offer = ArtifactOffer(digest=file.digest, size=file.size, chunk_size=chunk_size, chunks=count)
    # paho sends QoS 1 messages in the order they were published: the offer goes first.
    in_flight: deque[tuple[Acknowledgement, int]] = deque()
    in_flight.append((publish(namespace.upload_offer(proplet, hex_digest), offer.encode()), 0))
    queued = 0
    hasher = hashlib.sha256()
    with file.path.open("rb") as f:
        for index in range(count):
            if stopped():
                raise FilesError(f"stopped while uploading output {file.name}")
            chunk = f.read(chunk_size)
            expected = min(chunk_size, file.size - index * chunk_size)
            if len(chunk) != expected:
                raise FilesError(f"outputs: /out/{file.name} changed while it was uploaded")
            hasher.update(chunk)
            info = publish(namespace.upload_chunk(proplet, hex_digest, index), chunk)
            in_flight.append((info, len(chunk)))
            queued += len(chunk)
            while queued > window_bytes:
                oldest, length = in_flight.popleft()
                _acknowledged(oldest, file, ack_timeout)
                queued -= length
    if "sha256:" + hasher.hexdigest() != file.digest:
        # The receiver throws such an upload away; the run must not claim it.
        raise FilesError(f"outputs: /out/{file.name} changed while it was uploaded")
    return count


def _acknowledged(info: Acknowledgement, file: OutputFile, timeout: float = ACK_TIMEOUT) -> None:
    try:
        info.wait_for_publish(timeout)
        done = info.is_published()
    except (RuntimeError, ValueError):  # paho: not queued, or the connection is gone
        raise FilesError(
            f"output {file.name} not uploaded: the broker connection was lost"
        ) from None
    if not done:
        raise FilesError(
            f"output {file.name} not uploaded: the broker did not acknowledge it"
            f" within {timeout:g} s"
        )
