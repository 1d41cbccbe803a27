"""What the agent must remember across restarts, kept as one JSON file in its data dir.

It holds the last desired set applied (so a broker that lost its retained messages does not empty
the agent), and per task the spec it last ran, how often, and whether a run was in progress or
already finished (so a one-shot task is not run twice for one spec, and an interrupted run is).

Writes happen on a writer thread so that starting a task does not wait for the disk: ``save``
takes a snapshot and returns; the newest snapshot is written soon after, and ``flush`` waits for
it. A crash in that window (about a millisecond) can lose the last change, which at worst runs
a one-shot task once more: at least once, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

from pydantic import ValidationError

from schemas.messages import DesiredSet

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


@dataclass(slots=True)
class TaskMemory:
    spec_hash: str
    runs: int = 0
    restarts: int = 0
    in_progress: bool = False
    # "Completed" or "Failed" once a one-shot run of this spec has ended.
    finished: str | None = None
    exit_code: int | None = None
    result: str | None = None
    reason: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


_TASK_FIELDS = tuple(f.name for f in fields(TaskMemory))


@dataclass(slots=True)
class Memory:
    desired: DesiredSet | None = None
    tasks: dict[str, TaskMemory] = field(default_factory=dict)


class Journal:
    """Reads and atomically rewrites ``<dir>/journal.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "journal.json"
        directory.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._pending: str | None = None
        self._writing = False
        self._writer: threading.Thread | None = None

    def load(self) -> Memory:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Memory()
        except (OSError, ValueError) as exc:
            log.error("journal %s unreadable (%s); starting empty", self.path, exc)
            return Memory()
        try:
            desired = raw.get("desired")
            return Memory(
                desired=DesiredSet.model_validate_json(desired) if desired else None,
                tasks={name: TaskMemory(**t) for name, t in raw.get("tasks", {}).items()},
            )
        except (ValidationError, TypeError, AttributeError) as exc:
            log.error("journal %s invalid (%s); starting empty", self.path, exc)
            return Memory()

    def save(self, memory: Memory) -> None:
        """Snapshot ``memory`` now; the writer thread puts the newest snapshot on disk."""
        body = json.dumps(
            {
                "version": JOURNAL_VERSION,
                "desired": memory.desired.model_dump_json() if memory.desired else None,
                "tasks": {
                    name: {f: getattr(t, f) for f in _TASK_FIELDS}
                    for name, t in memory.tasks.items()
                },
            },
            separators=(",", ":"),
        )
        with self._cond:
            self._pending = body
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="journal", daemon=True)
                self._writer.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every snapshot taken so far is on disk."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and not self._writing, timeout=timeout
            )

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None)
                body, self._pending = self._pending, None
                self._writing = True
            try:
                assert body is not None
                tmp.write_text(body)
                os.replace(tmp, self.path)
            except OSError as exc:
                log.error("journal %s not written: %s", self.path, exc)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
