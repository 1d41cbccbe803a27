"""How converge judges each action from what proplets report (pure helpers, no broker)."""

from __future__ import annotations

import pytest

from reconciler.converge import _caught_up, _outcome, _settled
from reconciler.observe import FleetData
from reconciler.plan import Action
from schemas.messages import (
    DesiredSet,
    DesiredTask,
    ReportedState,
    Runtime,
    TaskState,
    TaskStatus,
)

DIGEST = "sha256:" + "cd" * 32


def wire(name: str, daemon: bool = False) -> DesiredTask:
    return DesiredTask(
        name=name, spec_hash="h1", owner="propctl", digest=DIGEST, size=1, daemon=daemon
    )


def state(gen: int, *tasks: TaskStatus) -> ReportedState:
    return ReportedState(
        proplet="p1", runtime=Runtime.WASMTIME, max_tasks=4, observed_generation=gen, ts=1.0,
        tasks=list(tasks),
    )  # fmt: skip


def st(name: str, s: TaskState, reason: str | None = None) -> TaskStatus:
    return TaskStatus(name=name, spec_hash="h1", owner="propctl", state=s, reason=reason)


SET = DesiredSet(generation=3, tasks=[wire("job"), wire("srv", daemon=True)])


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (None, False),
        (state(2, st("job", TaskState.COMPLETED), st("srv", TaskState.RUNNING)), False),
        (state(3, st("job", TaskState.COMPLETED)), False),  # srv not reported yet
        (
            state(
                3,
                st("job", TaskState.PENDING, "waiting for artifact sha256:x (request 1)"),
                st("srv", TaskState.RUNNING),
            ),
            False,
        ),
        (state(3, st("job", TaskState.RUNNING), st("srv", TaskState.PENDING)), True),
        (state(4, st("job", TaskState.FAILED), st("srv", TaskState.RUNNING)), True),
    ],
)
def test_caught_up_needs_generation_tasks_and_modules(
    report: ReportedState | None, expected: bool
) -> None:
    data = FleetData(reported={"p1": report} if report else {})
    assert _caught_up(data, "p1", SET) is expected


@pytest.mark.parametrize(
    ("status", "daemon", "expected"),
    [
        (None, False, False),
        (st("x", TaskState.COMPLETED), False, True),
        (st("x", TaskState.FAILED), False, True),  # a finished one-shot settles, failed
        (st("x", TaskState.RUNNING), False, False),
        (st("x", TaskState.RUNNING), True, True),
        (st("x", TaskState.FAILED), True, False),  # a daemon that keeps failing never settles
    ],
)
def test_settled(status: TaskStatus | None, daemon: bool, expected: bool) -> None:
    assert _settled(status, daemon) is expected


def outcome_of(
    action: Action,
    report: ReportedState | None,
    *,
    alive: bool = True,
    wait: bool = False,
    failed: dict[str, str] | None = None,
) -> tuple[str, str | None]:
    data = FleetData(reported={"p1": report} if report else {}, desired={"p1": SET})
    sent = {} if failed else {"p1": SET}
    result = _outcome(data, action, sent, failed or {}, {"p1"} if alive else set(), wait)
    return result.outcome, result.detail


CREATE = Action("create", "job", "p1", new_hash="h1")
DONE = state(3, st("job", TaskState.COMPLETED), st("srv", TaskState.RUNNING))


def test_outcomes() -> None:
    assert outcome_of(CREATE, DONE) == ("applied", None)
    assert outcome_of(CREATE, DONE, wait=True)[0] == "completed"
    assert outcome_of(Action("create", "srv", "p1"), DONE, wait=True)[0] == "running"
    assert outcome_of(CREATE, None, alive=False)[0] == "pending"
    kind, detail = outcome_of(CREATE, state(2))
    assert kind == "timeout" and detail == "proplet reports generation 2, expected 3"
    failing = state(
        3, st("job", TaskState.FAILED, "trap: unreachable"), st("srv", TaskState.RUNNING)
    )
    assert outcome_of(CREATE, failing, wait=True) == ("failed", "trap: unreachable")
    assert outcome_of(CREATE, DONE, failed={"p1": "too big"}) == ("failed", "too big")
    pending = Action("pending", "big", None, "3 matching proplets are at capacity")
    assert outcome_of(pending, DONE) == ("pending", "3 matching proplets are at capacity")
