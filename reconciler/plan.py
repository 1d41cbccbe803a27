"""Desired state + observed fleet -> the desired sets to publish and what each one does.

Pure and deterministic: the same revision and snapshot always give the same plan, and a plan
computed from the state a previous plan produced publishes nothing. Only tasks owned by
``owner`` are ever added, changed or removed; other owners' tasks stay in every set as they are
and count against capacity.
"""

from __future__ import annotations

import gc
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from reconciler.desired import DesiredState, ResolvedTask, wire_task
from reconciler.observed import ObservedProplet, ObservedState
from reconciler.placement import Demand, Node, Requirement, place
from schemas.messages import DesiredSet, DesiredTask

ActionKind = Literal["create", "update", "delete", "unchanged", "pending", "orphan"]
DEFAULT_OWNER = "propctl"


@dataclass(frozen=True, slots=True)
class Action:
    """One task on one proplet (``proplet`` is ``None`` for a task pending everywhere)."""

    kind: ActionKind
    task: str
    proplet: str | None
    reason: str | None = None
    old_hash: str | None = None
    new_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Desired sets to publish (only those whose tasks changed) and every task's action."""

    revision: str
    sets: Mapping[str, DesiredSet]
    actions: tuple[Action, ...]

    @property
    def changed(self) -> bool:
        return bool(self.sets)

    def of_kind(self, kind: ActionKind) -> tuple[Action, ...]:
        return tuple(action for action in self.actions if action.kind == kind)


@dataclass(slots=True)
class _Current:
    """One proplet's set as observed, split into what this owner manages and the rest."""

    proplet: ObservedProplet
    ours: dict[str, DesiredTask]
    fixed: list[DesiredTask]  # stays as it is: other owners', orphans, unresolved modules


def plan(
    desired: DesiredState,
    observed: ObservedState,
    *,
    prune: bool,
    owner: str = DEFAULT_OWNER,
    republish: Collection[str] = (),
) -> Plan:
    """Place ``desired`` on the fleet in ``observed`` and compute the sets that change.

    ``republish`` names proplets whose set must be published even when it did not change:
    the broker lost its retained copy (it restarted), and the observed set is the one this
    reconciler remembers writing.
    """
    with _collector_paused():
        return _plan(desired, observed, prune=prune, owner=owner, republish=republish)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while planning.

    A plan keeps about ten new objects per task alive and creates no reference cycles (its
    garbage goes by reference counting). Those survivors trigger a full collection that walks
    the whole heap, inputs included: measured at 0.2 s of a 0.45 s plan for 10,000 tasks.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan(
    desired: DesiredState,
    observed: ObservedState,
    *,
    prune: bool,
    owner: str,
    republish: Collection[str],
) -> Plan:
    tasks = {task.manifest_name: task for task in desired.tasks}
    if len(tasks) != len(desired.tasks):
        raise ValueError("desired state holds two tasks with the same name")
    wire = {name: wire_task(task, owner) for name, task in tasks.items() if task.resolved}
    actions: list[Action] = []
    jobs = {job.name for job in desired.jobs}
    current = _split(observed, tasks, wire, prune, owner, actions, desired.retired, jobs)

    nodes = [
        Node(
            id=proplet_id,
            runtime=entry.proplet.runtime,
            labels=entry.proplet.labels,
            capacity=entry.proplet.max_tasks,
            alive=entry.proplet.alive,
            lost=entry.proplet.lost,
            load=len(entry.fixed),
            taken=frozenset(task.name for task in entry.fixed if task.owner != owner),
        )
        for proplet_id, entry in current.items()
    ]
    holders: dict[str, list[str]] = {}
    for proplet_id, entry in current.items():
        for name in entry.ours:
            holders.setdefault(name, []).append(proplet_id)
    demands = [_demand(task, holders.get(name, ())) for name, task in tasks.items() if name in wire]
    assignment = place(demands, nodes)

    placed_on: dict[str, list[DesiredTask]] = {}
    for name, proplets in assignment.placed.items():
        new = wire[name]
        for proplet_id in proplets:
            placed_on.setdefault(proplet_id, []).append(new)
            old = current[proplet_id].ours.get(name)
            if old is None:
                actions.append(Action("create", name, proplet_id, new_hash=new.spec_hash))
            elif old.spec_hash != new.spec_hash:
                actions.append(
                    Action("update", name, proplet_id, "spec changed", old.spec_hash, new.spec_hash)
                )
            else:
                actions.append(
                    Action("unchanged", name, proplet_id, None, old.spec_hash, new.spec_hash)
                )
    for (name, proplet_id), reason in assignment.removed.items():
        old = current[proplet_id].ours[name]
        actions.append(Action("delete", name, proplet_id, reason, old.spec_hash))
    for name, reason in assignment.pending.items():
        pin = tasks[name].spec.placement.proplet
        actions.append(Action("pending", name, pin, reason, new_hash=wire[name].spec_hash))
    for name, unresolved in tasks.items():
        if name not in wire:
            actions.append(
                Action(
                    "pending",
                    name,
                    unresolved.spec.placement.proplet,
                    f"module image {unresolved.image}: {unresolved.error}"
                    if unresolved.error
                    else f"module image {unresolved.image} is not resolved to a digest yet",
                )
            )

    actions.sort(key=lambda a: (a.task, a.proplet or "", a.kind))
    return Plan(
        revision=desired.revision,
        sets=_changed_sets(current, placed_on, owner, republish),
        actions=tuple(actions),
    )


def _split(
    observed: ObservedState,
    tasks: Mapping[str, ResolvedTask],
    wire: Mapping[str, DesiredTask],
    prune: bool,
    owner: str,
    actions: list[Action],
    retired: Mapping[str, str],
    jobs: Collection[str],
) -> dict[str, _Current]:
    """Each proplet's set split into tasks to place and tasks to leave; prunes and orphans."""
    current: dict[str, _Current] = {}
    for proplet_id in sorted(observed.proplets):
        proplet = observed.proplets[proplet_id]
        entry = _Current(proplet, {}, [])
        for task in proplet.desired.tasks if proplet.desired is not None else []:
            if task.owner != owner:
                entry.fixed.append(task)
            elif task.name in wire:
                entry.ours[task.name] = task
            elif task.name in tasks:
                entry.fixed.append(task)  # its module is not resolved: leave it running
            elif task.name in retired:
                actions.append(
                    Action("delete", task.name, proplet_id, retired[task.name], task.spec_hash)
                )
            elif task.name in jobs:
                entry.fixed.append(task)  # a round of a job that this pass does not drive
            elif prune:
                actions.append(
                    Action("delete", task.name, proplet_id, "removed from Git", task.spec_hash)
                )
            else:
                entry.fixed.append(task)
                actions.append(
                    Action(
                        "orphan",
                        task.name,
                        proplet_id,
                        "removed from Git; kept because prune is off",
                        task.spec_hash,
                    )
                )
        current[proplet_id] = entry
    return current


def _changed_sets(
    current: Mapping[str, _Current],
    placed_on: Mapping[str, list[DesiredTask]],
    owner: str,
    republish: Collection[str],
) -> dict[str, DesiredSet]:
    """The new set of every proplet whose tasks differ from the set it holds."""
    sets: dict[str, DesiredSet] = {}
    for proplet_id, entry in current.items():
        new_tasks = sorted([*entry.fixed, *placed_on.get(proplet_id, [])], key=_key)
        held = entry.proplet.desired.tasks if entry.proplet.desired is not None else []
        if entry.proplet.desired is None and not new_tasks:
            continue
        unchanged = [_key(task) for task in new_tasks] == sorted(_key(task) for task in held)
        if unchanged and proplet_id not in republish:
            continue
        sets[proplet_id] = DesiredSet(
            generation=entry.proplet.next_generation, issuer=owner, tasks=new_tasks
        )
    return sets


def _key(task: DesiredTask) -> tuple[str, str, str]:
    # The spec hash covers every other field, so equal keys mean equal tasks.
    return (task.name, task.owner, task.spec_hash)


def _demand(task: ResolvedTask, holders: list[str] | tuple[str, ...]) -> Demand:
    placement = task.spec.placement
    return Demand(
        task=task.manifest_name,
        need=Requirement.of(placement.runtime, placement.selector, placement.proplet, task.among),
        replicas=placement.count,
        spread=placement.spread == "all" or task.among is not None,
        holders=tuple(holders),
    )
