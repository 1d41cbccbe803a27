"""What the agent must remember across restarts, kept as one JSON file in its data dir.

It holds the last desired set applied (so a broker that lost its retained messages does not empty
the agent), and per task the spec it last ran, how often, and whether a run was in progress or
already finished (so a one-shot task is not run twice for one spec, and an interrupted run is).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
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


@dataclass(slots=True)
class Memory:
    desired: DesiredSet | None = None
    tasks: dict[str, TaskMemory] = field(default_factory=dict)


class Journal:
    """Reads and atomically rewrites ``<dir>/journal.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "journal.json"
        directory.mkdir(parents=True, exist_ok=True)

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
        body = {
            "version": JOURNAL_VERSION,
            "desired": memory.desired.model_dump_json() if memory.desired else None,
            "tasks": {name: asdict(t) for name, t in memory.tasks.items()},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, separators=(",", ":")))
        os.replace(tmp, self.path)
