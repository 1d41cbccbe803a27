"""What runs where: desired sets joined with reported state, as rows for ``propctl get``.

Pure functions of a fleet snapshot. A task placed but not started yet shows as Pending; a task on
an offline proplet shows as Unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.observe import FleetData
from schemas.messages import TaskResult, TaskStatus

UNKNOWN = "Unknown"
PENDING = "Pending"


@dataclass(frozen=True, slots=True)
class TaskRow:
    name: str
    proplet: str
    state: str
    spec_hash: str
    owner: str
    result: str | None = None
    error: str | None = None
    runs: int = 0
    restarts: int = 0
    daemon: bool = False
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class PropletRow:
    id: str
    alive: bool
    runtime: str | None
    labels: dict[str, str] = field(default_factory=dict)
    tasks: int = 0
    max_tasks: int = 0
    observed_generation: int = 0
    desired_generation: int = 0
    version: str = ""


def _result_text(result: TaskResult | None, status: TaskStatus | None) -> str | None:
    if result is not None and result.result is not None:
        return ",".join(result.result)
    if result is not None and result.stdout:
        return result.stdout.strip()[-200:]
    return status.result if status is not None else None


def task_rows(data: FleetData) -> list[TaskRow]:
    rows: list[TaskRow] = []
    proplets = sorted(set(data.desired) | set(data.reported))
    for proplet in proplets:
        alive = data.presence.get(proplet, False)
        reported = data.reported.get(proplet)
        statuses = {t.name: t for t in reported.tasks} if reported else {}
        desired = data.desired.get(proplet)
        wanted = {t.name: t for t in desired.tasks} if desired else {}
        for name in sorted(set(wanted) | set(statuses)):
            spec = wanted.get(name)
            status = statuses.get(name)
            if spec is not None and status is not None and status.spec_hash != spec.spec_hash:
                status = None  # it still runs an older spec: the desired one has not started
            result = data.results.get((proplet, name))
            if result is not None and spec is not None and result.spec_hash != spec.spec_hash:
                result = None
            if not alive:
                state = UNKNOWN
            elif status is not None:
                state = status.state.value
            else:
                state = PENDING
            error = result.error if result is not None else None
            if error is None and status is not None and status.state.value in ("Failed",):
                error = status.reason
            rows.append(
                TaskRow(
                    name=name,
                    proplet=proplet,
                    state=state,
                    spec_hash=spec.spec_hash if spec else (status.spec_hash if status else ""),
                    owner=spec.owner if spec else (status.owner if status else ""),
                    result=_result_text(result, status),
                    error=error,
                    runs=status.runs if status else 0,
                    restarts=status.restarts if status else 0,
                    daemon=spec.daemon if spec else False,
                    started_at=status.started_at if status else None,
                    finished_at=status.finished_at if status else None,
                )
            )
    return rows


def proplet_rows(data: FleetData) -> list[PropletRow]:
    rows = []
    for proplet in sorted(set(data.desired) | set(data.reported) | set(data.presence)):
        reported = data.reported.get(proplet)
        desired = data.desired.get(proplet)
        rows.append(
            PropletRow(
                id=proplet,
                alive=data.presence.get(proplet, False),
                runtime=reported.runtime.value if reported else None,
                labels=dict(reported.labels) if reported else {},
                tasks=len(desired.tasks) if desired else (len(reported.tasks) if reported else 0),
                max_tasks=reported.max_tasks if reported else 0,
                observed_generation=reported.observed_generation if reported else 0,
                desired_generation=desired.generation if desired else 0,
                version=reported.version if reported else "",
            )
        )
    return rows


def task_results(data: FleetData, name: str) -> list[TaskResult]:
    return [r for (_p, task), r in sorted(data.results.items()) if task == name]
