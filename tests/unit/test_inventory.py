"""Rows of ``propctl get tasks``: desired sets joined with reported state, pure."""

from __future__ import annotations

import pytest

from reconciler.inventory import proplet_rows, task_rows
from reconciler.observe import FleetData
from schemas.messages import (
    DesiredSet,
    DesiredTask,
    ReportedState,
    Runtime,
    TaskResult,
    TaskState,
    TaskStatus,
)

DIGEST = "sha256:" + "ab" * 32


def wire(name: str, spec_hash: str = "h1", daemon: bool = False) -> DesiredTask:
    return DesiredTask(
        name=name, spec_hash=spec_hash, owner="propctl", digest=DIGEST, size=10, daemon=daemon
    )


def status(name: str, state: TaskState, spec_hash: str = "h1", **kw: object) -> TaskStatus:
    return TaskStatus(name=name, spec_hash=spec_hash, owner="propctl", state=state, **kw)  # type: ignore[arg-type]


def reported(proplet: str, *tasks: TaskStatus, gen: int = 1) -> ReportedState:
    return ReportedState(
        proplet=proplet, runtime=Runtime.WASMTIME, max_tasks=4, observed_generation=gen,
        ts=1.0, tasks=list(tasks), labels={"zone": "a"},
    )  # fmt: skip


def result(proplet: str, task: str, spec_hash: str = "h1", **kw: object) -> TaskResult:
    return TaskResult(
        proplet=proplet, task=task, spec_hash=spec_hash, state=TaskState.COMPLETED, runs=1,
        started_at=1.0, finished_at=2.0, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def data(
    desired: dict[str, list[DesiredTask]],
    reports: dict[str, ReportedState],
    online: set[str],
    results: list[TaskResult] = (),  # type: ignore[assignment]
) -> FleetData:
    return FleetData(
        reported=reports,
        desired={p: DesiredSet(generation=1, tasks=t) for p, t in desired.items()},
        presence={p: p in online for p in set(desired) | set(reports)},
        results={(r.proplet, r.task): r for r in results},
    )


@pytest.mark.parametrize(
    ("desired", "reports", "online", "expected"),
    [
        # Placed but not reported yet: Pending.
        ({"p1": [wire("a")]}, {}, {"p1"}, [("a", "p1", "Pending")]),
        # Reported with the same spec: its state.
        (
            {"p1": [wire("a")]},
            {"p1": reported("p1", status("a", TaskState.RUNNING))},
            {"p1"},
            [("a", "p1", "Running")],
        ),
        # Reported with an older spec: the desired one has not started.
        (
            {"p1": [wire("a", "h2")]},
            {"p1": reported("p1", status("a", TaskState.RUNNING, "h1"))},
            {"p1"},
            [("a", "p1", "Pending")],
        ),
        # Offline proplet: Unknown, whatever it last reported.
        (
            {"p1": [wire("a")]},
            {"p1": reported("p1", status("a", TaskState.RUNNING))},
            set(),
            [("a", "p1", "Unknown")],
        ),
        # Reported but no longer desired (being stopped): shown with its reported state.
        (
            {"p1": []},
            {"p1": reported("p1", status("gone", TaskState.STOPPED))},
            {"p1"},
            [("gone", "p1", "Stopped")],
        ),
    ],
)
def test_task_states(
    desired: dict[str, list[DesiredTask]],
    reports: dict[str, ReportedState],
    online: set[str],
    expected: list[tuple[str, str, str]],
) -> None:
    rows = task_rows(data(desired, reports, online))
    assert [(r.name, r.proplet, r.state) for r in rows] == expected


def test_result_and_error_come_from_the_matching_result() -> None:
    fleet = data(
        {"p1": [wire("ok"), wire("bad", "h9")]},
        {
            "p1": reported(
                "p1",
                status("ok", TaskState.COMPLETED, result="7"),
                status("bad", TaskState.FAILED, "h9", reason="timed out after 5 ms"),
            )
        },
        {"p1"},
        [result("p1", "ok", result=["7"]), result("p1", "bad", "h1", error="stale error")],
    )
    rows = {r.name: r for r in task_rows(fleet)}
    assert (rows["ok"].result, rows["ok"].error) == ("7", None)
    # The stored result belongs to an older spec: the reported reason is shown instead.
    assert rows["bad"].error == "timed out after 5 ms"
    assert rows["bad"].spec_hash == "h9"


def test_proplet_rows_count_desired_tasks() -> None:
    fleet = data(
        {"p1": [wire("a"), wire("b")], "ghost": [wire("c")]},
        {"p1": reported("p1", status("a", TaskState.RUNNING))},
        {"p1"},
    )
    rows = {r.id: r for r in proplet_rows(fleet)}
    assert (rows["p1"].alive, rows["p1"].runtime, rows["p1"].tasks) == (True, "wasmtime", 2)
    assert rows["p1"].labels == {"zone": "a"}
    assert (rows["ghost"].alive, rows["ghost"].runtime, rows["ghost"].tasks) == (False, None, 1)
