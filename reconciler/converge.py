"""The one executor: publish a plan's desired sets and watch the fleet catch up.

Nothing else in the reconciler writes to the broker. Each action of the plan ends with exactly
one outcome, computed from what the proplets report, never assumed from what was sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from reconciler.broker import Broker
from reconciler.observe import FleetData, FleetView
from reconciler.plan import Action, Plan
from schemas.messages import MAX_MESSAGE_BYTES, DesiredSet, DesiredTask, TaskState, TaskStatus

log = logging.getLogger(__name__)

OutcomeKind = Literal[
    "applied",  # the proplet reported the new generation
    "running",  # --wait: the daemon runs
    "completed",  # --wait: the one-shot task completed
    "failed",  # the task failed, or the set could not be sent
    "timeout",  # the proplet did not catch up in time
    "pending",  # offline proplet (converges when it returns) or nowhere to place it
    "unchanged",
    "orphan",
    "dry-run",
    "superseded",  # another pass published a newer set for this proplet meanwhile
]
FAILED_OUTCOMES = frozenset({"failed", "timeout"})
WAITING_FOR_ARTIFACT = "waiting for artifact"


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    outcome: OutcomeKind
    detail: str | None = None


Progress = Callable[[str], None]


def publish_sets(
    broker: Broker, view: FleetView, plan: Plan, *, issuer: str, now: float
) -> tuple[dict[str, DesiredSet], dict[str, str]]:
    """Publish every changed set (retained, QoS 1); returns what was sent and what failed."""
    sent: dict[str, DesiredSet] = {}
    failed: dict[str, str] = {}
    pending = []
    for proplet, desired in sorted(plan.sets.items()):
        stamped = desired.model_copy(update={"issued_at": now, "issuer": issuer})
        payload = stamped.encode()
        if len(payload) > MAX_MESSAGE_BYTES:
            failed[proplet] = (
                f"desired set of {len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
            )
            continue
        pending.append((proplet, stamped, broker.publish(view.ns.desired(proplet), payload,
                                                         retain=True)))  # fmt: skip
    for proplet, stamped, info in pending:
        try:
            info.wait_for_publish(timeout=10)
        except (RuntimeError, ValueError) as exc:
            failed[proplet] = f"publish failed: {exc}"
            continue
        if info.is_published():
            sent[proplet] = stamped
        else:
            failed[proplet] = "the broker did not acknowledge the desired set"
    return sent, failed


def _status(data: FleetData, proplet: str, task: DesiredTask) -> TaskStatus | None:
    reported = data.reported.get(proplet)
    if reported is None:
        return None
    for status in reported.tasks:
        if status.name == task.name and status.spec_hash == task.spec_hash:
            return status
    return None


def _superseded(data: FleetData, proplet: str, desired: DesiredSet) -> bool:
    held = data.desired.get(proplet)
    return held is not None and held.generation > desired.generation


def _waiting_for(
    data: FleetData, proplet: str, desired: DesiredSet, serving: Collection[str]
) -> bool:
    """Whether the proplet reports a task still waiting for a module this pass serves."""
    for task in desired.tasks:
        if task.digest not in serving:
            continue
        status = _status(data, proplet, task)
        if status is not None and status.reason and status.reason.startswith(WAITING_FOR_ARTIFACT):
            return True
    return False


def _caught_up(data: FleetData, proplet: str, desired: DesiredSet) -> bool:
    """The proplet applied the set and holds every module it needs."""
    reported = data.reported.get(proplet)
    if reported is None or reported.observed_generation < desired.generation:
        return False
    for task in desired.tasks:
        status = _status(data, proplet, task)
        if status is None:
            return False
        if status.reason and status.reason.startswith(WAITING_FOR_ARTIFACT):
            return False
    return True


def _settled(status: TaskStatus | None, daemon: bool) -> bool:
    if status is None:
        return False
    if status.state is TaskState.FAILED and not daemon:
        return True
    wanted = TaskState.RUNNING if daemon else TaskState.COMPLETED
    return status.state is wanted


def converge(
    broker: Broker,
    view: FleetView,
    plan: Plan,
    *,
    issuer: str,
    wait: bool,
    timeout: float,
    progress: Progress,
    serving: Collection[str] = (),
    dry_run: bool = False,
    unwatched: Collection[str] = (),
) -> tuple[Outcome, ...]:
    """Publish the plan and wait as far as asked; one outcome per action.

    ``unwatched`` names tasks that ``wait`` does not wait for: a federated round's tasks,
    which their coordinator follows.

    Besides the proplets whose set changed, the pass waits for live proplets that still wait
    for a module it serves (they came back after the pass that sent their set): a Git-stored
    module reaches them only while some pass runs.
    """
    if dry_run:
        return tuple(_dry(action) for action in plan.actions)
    alive, held = view.read(
        lambda d: ({p for p, online in d.presence.items() if online}, dict(d.desired))
    )
    sent, failed = publish_sets(broker, view, plan, issuer=issuer, now=time.time())
    if sent:
        progress(f"published {len(sent)} desired set(s); waiting for live proplets")
    live_targets = {p: s for p, s in sent.items() if p in alive}

    def stranded(data: FleetData) -> dict[str, DesiredSet]:
        return {
            p: s
            for p, s in held.items()
            if p in alive
            and p not in sent
            and p not in failed
            and _waiting_for(data, p, s, serving)
        }

    live_targets.update(view.read(stranded))
    # Sets that did not change still count when waiting for tasks to settle.
    watched: dict[str, DesiredSet] = dict(live_targets)
    if wait:
        for proplet, desired in held.items():
            if proplet in alive and proplet not in watched and proplet not in failed:
                watched[proplet] = desired

    def done(data: FleetData) -> bool:
        for proplet, desired in watched.items():
            if _superseded(data, proplet, desired):
                continue
            if proplet in live_targets and not _caught_up(data, proplet, desired):
                return False
            if wait and not all(
                _settled(_status(data, proplet, t), t.daemon)
                for t in desired.tasks
                if t.name not in unwatched
            ):
                return False
        return True

    deadline = time.monotonic() + timeout
    reported_progress = ""
    while not view.wait(done, timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            break
        line = view.read(lambda d: _progress_line(d, watched, live_targets, wait))
        if line != reported_progress:
            progress(line)
            reported_progress = line
    data_outcomes = view.read(
        lambda d: tuple(
            _outcome(d, action, live_targets, failed, alive, wait) for action in plan.actions
        )
    )
    return data_outcomes


def _progress_line(
    data: FleetData, watched: Mapping[str, DesiredSet], targets: Mapping[str, DesiredSet],
    wait: bool,
) -> str:  # fmt: skip
    applied = sum(1 for p, s in targets.items() if _caught_up(data, p, s))
    line = f"{applied}/{len(targets)} proplets applied"
    if wait:
        tasks = [(p, t) for p, s in watched.items() for t in s.tasks]
        settled = sum(1 for p, t in tasks if _settled(_status(data, p, t), t.daemon))
        line += f", {settled}/{len(tasks)} tasks settled"
    return line


def _dry(action: Action) -> Outcome:
    if action.kind in ("unchanged", "orphan", "pending"):
        return Outcome(action, action.kind, action.reason)
    return Outcome(action, "dry-run", action.reason)


def _outcome(
    data: FleetData,
    action: Action,
    targets: Mapping[str, DesiredSet],
    failed: Mapping[str, str],
    alive: set[str],
    wait: bool,
) -> Outcome:
    proplet = action.proplet
    if action.kind in ("pending", "orphan"):
        return Outcome(action, action.kind, action.reason)
    assert proplet is not None
    if proplet in failed:
        return Outcome(action, "failed", failed[proplet])
    if proplet not in alive:
        if action.kind == "unchanged":
            return Outcome(action, "unchanged", "proplet offline")
        return Outcome(action, "pending", "proplet offline; it converges when it returns")
    desired = targets.get(proplet)
    if desired is not None and _superseded(data, proplet, desired):
        newer = data.desired[proplet].generation
        return Outcome(action, "superseded", f"another pass published generation {newer}")
    if desired is not None and not _caught_up(data, proplet, desired):
        reported = data.reported.get(proplet)
        seen = reported.observed_generation if reported else 0
        if seen < desired.generation:
            detail = f"proplet reports generation {seen}, expected {desired.generation}"
        else:
            detail = "proplet is still fetching its modules"
        return Outcome(action, "timeout", detail)
    if action.kind == "delete":
        return Outcome(action, "applied", action.reason)
    if not wait:
        kind: OutcomeKind = "unchanged" if action.kind == "unchanged" else "applied"
        return Outcome(action, kind, action.reason)
    held = desired or data.desired.get(proplet)
    task = next((t for t in held.tasks if t.name == action.task), None) if held else None
    status = _status(data, proplet, task) if task is not None else None
    if task is None or status is None:
        return Outcome(action, "timeout", "the proplet has not reported the task")
    if status.state is TaskState.FAILED:
        return Outcome(action, "failed", status.reason)
    if _settled(status, task.daemon):
        return Outcome(action, "running" if task.daemon else "completed", status.result)
    return Outcome(action, "timeout", f"task is {status.state.value}: {status.reason or ''}")
