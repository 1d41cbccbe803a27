"""Which proplets run which task: deterministic, stable, capacity-aware placement.

Two passes over the tasks, in name order:

1. Keep. A task stays on every proplet that holds it and is still eligible, even an offline
   one, so a proplet joining the fleet moves nothing. Excess replicas (after a scale-down) leave
   the most loaded proplet first; a proplet over its capacity sheds tasks from the end of the
   alphabet.
2. Place. Missing instances go to alive eligible proplets with free capacity, least loaded
   first (ties by id). Pinned tasks go first (they have one choice), then ``spread: all``, then
   the rest. Whatever does not fit is pending, with a reason a person understands.

Cost is about linear in tasks plus proplets: proplets are grouped by (runtime, labels), the
eligible list is computed once per distinct requirement, and least-loaded lookups use a heap per
requirement whose stale entries are refreshed when popped (loads only grow while placing).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from schemas.messages import Runtime

RuntimeWanted = Literal["wasmtime", "wamr", "any"]
# A desired set holds at most this many tasks (DesiredSet.tasks max_length).
MAX_SET_TASKS = 1024


@dataclass(frozen=True, slots=True)
class Requirement:
    """Where a task may run. Tasks with equal requirements share one eligible list."""

    runtime: RuntimeWanted = "any"
    selector: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    pin: str | None = None
    among: frozenset[str] | None = None  # only these proplets (a federated round's clients)

    @classmethod
    def of(
        cls,
        runtime: RuntimeWanted,
        selector: Mapping[str, str],
        pin: str | None,
        among: frozenset[str] | None = None,
    ) -> Requirement:
        return cls(runtime, tuple(sorted(selector.items())), pin, among)

    def describe(self) -> str:
        text = f"runtime={self.runtime}"
        if self.selector:
            text += " selector {" + ", ".join(f"{k}: {v}" for k, v in self.selector) + "}"
        return text

    def matches(self, runtime: Runtime, labels: Mapping[str, str]) -> bool:
        if self.runtime not in ("any", runtime.value):
            return False
        return all(labels.get(key) == value for key, value in self.selector)


@dataclass(frozen=True, slots=True)
class Demand:
    """One task to place: its requirement, how many instances, and where it is now."""

    task: str
    need: Requirement
    replicas: int = 1
    spread: bool = False
    holders: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Node:
    """A proplet as placement sees it.

    ``load`` counts the tasks in its set that placement does not manage (other owners' tasks,
    tasks kept as they are); ``taken`` are names it cannot hold again (another owner's tasks).
    ``runtime`` is ``None`` for a proplet that never reported: it keeps what it holds and gets
    nothing new.
    """

    id: str
    runtime: Runtime | None
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: int = 0
    alive: bool = True
    load: int = 0
    taken: frozenset[str] = frozenset()
    lost: bool = False  # offline past the bound: unpinned replicas move off it


@dataclass(frozen=True, slots=True)
class Assignment:
    """The outcome: where each task runs, why some could not be placed, what leaves where."""

    placed: Mapping[str, tuple[str, ...]]  # task -> proplets, sorted
    pending: Mapping[str, str]  # task -> reason
    removed: Mapping[tuple[str, str], str]  # (task, proplet) -> reason


@dataclass(slots=True)
class _Pool:
    """The proplets eligible for one requirement, and the least-loaded heap over them."""

    matching: list[str]  # every known eligible proplet, sorted
    alive: list[str]
    heap: list[tuple[int, str]] | None = None


class _Fleet:
    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = {node.id: node for node in nodes}
        self.loads = {node.id: node.load for node in nodes}
        self.capacity = {node.id: min(node.capacity, MAX_SET_TASKS) for node in nodes}
        groups: dict[tuple[Runtime, frozenset[tuple[str, str]]], list[Node]] = {}
        for node in sorted(nodes, key=lambda n: n.id):
            if node.runtime is not None:
                key = (node.runtime, frozenset(node.labels.items()))
                groups.setdefault(key, []).append(node)
        self.groups = groups
        self.pools: dict[Requirement, _Pool] = {}

    def pool(self, need: Requirement) -> _Pool:
        pool = self.pools.get(need)
        if pool is None:
            members: list[Node] = []
            for (runtime, labels), group in self.groups.items():
                if need.matches(runtime, dict(labels)):
                    members.extend(n for n in group if need.among is None or n.id in need.among)
            members.sort(key=lambda n: n.id)
            pool = _Pool([n.id for n in members], [n.id for n in members if n.alive])
            self.pools[need] = pool
        return pool

    def may_keep(self, proplet: str, need: Requirement, spread: bool = False) -> bool:
        node = self.nodes.get(proplet)
        if node is None or (need.pin is not None and need.pin != proplet):
            return False
        if need.among is not None and proplet not in need.among:
            return False
        if node.lost and need.pin is None and not spread:
            return False  # a replica on a lost proplet runs elsewhere; pinned ones wait for it
        # A proplet that never reported cannot be judged; leave its tasks where they are.
        return node.runtime is None or need.matches(node.runtime, node.labels)

    def full(self, proplet: str) -> bool:
        return self.loads[proplet] >= self.capacity[proplet]

    def take(self, pool: _Pool, count: int, task: str, holding: set[str]) -> list[str]:
        """Up to ``count`` least-loaded alive proplets of ``pool`` with room, not in ``holding``."""
        if pool.heap is None:
            pool.heap = [(self.loads[p], p) for p in pool.alive if not self.full(p)]
            heapq.heapify(pool.heap)
        heap = pool.heap
        chosen: list[str] = []
        aside: list[tuple[int, str]] = []
        while heap and len(chosen) < count:
            load, proplet = heapq.heappop(heap)
            current = self.loads[proplet]
            if current >= self.capacity[proplet]:
                continue  # full for good: loads only grow while placing
            if current != load:
                heapq.heappush(heap, (current, proplet))
                continue
            if proplet in holding or task in self.nodes[proplet].taken:
                aside.append((load, proplet))
                continue
            chosen.append(proplet)
        for proplet in chosen:
            self.loads[proplet] += 1
            if not self.full(proplet):
                heapq.heappush(heap, (self.loads[proplet], proplet))
        for entry in aside:
            heapq.heappush(heap, entry)
        return chosen


def place(demands: Sequence[Demand], nodes: Sequence[Node]) -> Assignment:
    """Place every demand on ``nodes``; the same input always gives the same assignment."""
    fleet = _Fleet(nodes)
    ordered = sorted(demands, key=lambda d: d.task)
    removed: dict[tuple[str, str], str] = {}
    kept: dict[str, list[str]] = {}

    # Pass 1: keep what is still allowed.
    for demand in ordered:
        holders = sorted(set(demand.holders))
        keep = [p for p in holders if fleet.may_keep(p, demand.need, demand.spread)]
        for proplet in holders:
            if proplet not in keep:
                removed[(demand.task, proplet)] = _why_not_kept(fleet, proplet, demand.need)
        kept[demand.task] = keep
        for proplet in keep:
            fleet.loads[proplet] += 1
    for demand in ordered:
        keep = kept[demand.task]
        if demand.spread or len(keep) <= demand.replicas:
            continue
        # Scale down: the most loaded (then highest id) instances go first.
        keep.sort(key=lambda p: (fleet.loads[p], p), reverse=True)
        excess = len(keep) - demand.replicas
        for proplet in keep[:excess]:
            fleet.loads[proplet] -= 1
            removed[(demand.task, proplet)] = f"scaled down to {_count(demand.replicas, 'replica')}"
        del keep[:excess]
        keep.sort()
    holds: dict[str, list[str]] = {}
    for demand in ordered:
        for proplet in kept[demand.task]:
            holds.setdefault(proplet, []).append(demand.task)
    for proplet, tasks in sorted(holds.items()):
        node = fleet.nodes[proplet]
        if node.runtime is None:
            continue  # capacity unknown
        for task in sorted(tasks, reverse=True):
            if not fleet.loads[proplet] > fleet.capacity[proplet]:
                break
            kept[task].remove(proplet)
            fleet.loads[proplet] -= 1
            removed[(task, proplet)] = (
                f"proplet {proplet} is over capacity ({_count(node.capacity, 'task')})"
            )

    # Pass 2: place what is missing, most constrained first.
    placed: dict[str, list[str]] = {d.task: list(kept[d.task]) for d in ordered}
    pending: dict[str, str] = {}
    for demand in sorted(ordered, key=lambda d: (d.need.pin is None, not d.spread, d.task)):
        where = placed[demand.task]
        if demand.need.pin is not None:
            reason = _place_pinned(fleet, demand, where)
        elif demand.spread:
            reason = _place_spread(fleet, demand, where)
        else:
            reason = _place_replicas(fleet, demand, where)
        if reason is not None:
            pending[demand.task] = reason
        where.sort()
    for task, proplet in list(removed):
        if proplet in placed[task]:
            del removed[(task, proplet)]  # left and came back in the same pass: it stays
    return Assignment(
        placed={task: tuple(where) for task, where in placed.items()},
        pending=pending,
        removed=removed,
    )


def _why_not_kept(fleet: _Fleet, proplet: str, need: Requirement) -> str:
    if need.pin is not None and need.pin != proplet:
        return f"the task is now pinned to proplet {need.pin}"
    node = fleet.nodes.get(proplet)
    if node is not None and node.lost:
        return f"proplet {proplet} is lost (offline past the bound); moved"
    return f"proplet {proplet} no longer matches {need.describe()}"


def _place_pinned(fleet: _Fleet, demand: Demand, where: list[str]) -> str | None:
    pin = demand.need.pin
    assert pin is not None
    if where:
        return None
    node = fleet.nodes.get(pin)
    if node is None:
        return f"pinned proplet {pin} is not known"
    if node.runtime is None:
        return f"pinned proplet {pin} has not reported its runtime and labels yet"
    if not demand.need.matches(node.runtime, node.labels):
        if demand.need.runtime not in ("any", node.runtime.value):
            return f"pinned proplet {pin} runs {node.runtime.value}, not {demand.need.runtime}"
        return f"pinned proplet {pin} does not match {demand.need.describe()}"
    if demand.task in node.taken:
        return f"pinned proplet {pin} already holds a task named {demand.task} of another owner"
    if fleet.full(pin):
        return f"pinned proplet {pin} is at capacity ({_count(node.capacity, 'task')})"
    # Offline is fine: the retained set waits for it.
    fleet.loads[pin] += 1
    where.append(pin)
    return None


def _fits(fleet: _Fleet, demand: Demand, proplet: str) -> bool:
    return demand.task not in fleet.nodes[proplet].taken and not fleet.full(proplet)


def _crowded_counts(
    fleet: _Fleet, pool: _Pool, demand: Demand, where: list[str]
) -> tuple[int, int]:
    """Alive matching proplets not holding the task: how many are full, how many blocked."""
    holding = set(where)
    full = blocked = 0
    for proplet in pool.alive:
        if proplet in holding:
            continue
        if demand.task in fleet.nodes[proplet].taken:
            blocked += 1
        elif fleet.full(proplet):
            full += 1
    return full, blocked


def _place_spread(fleet: _Fleet, demand: Demand, where: list[str]) -> str | None:
    pool = fleet.pool(demand.need)
    if not pool.alive:
        if where:
            return None  # held only by offline proplets; nothing alive to add
        return _nothing_alive(pool, demand.need)
    for proplet in pool.alive:
        if proplet not in where and _fits(fleet, demand, proplet):
            fleet.loads[proplet] += 1
            where.append(proplet)
    full, blocked = _crowded_counts(fleet, pool, demand, where)
    if not full and not blocked:
        return None
    on = len(pool.alive) - full - blocked
    return f"on {on} of {len(pool.alive)} alive matching proplets: " + _crowded(full, blocked)


def _place_replicas(fleet: _Fleet, demand: Demand, where: list[str]) -> str | None:
    missing = demand.replicas - len(where)
    if missing <= 0:
        return None
    pool = fleet.pool(demand.need)
    where.extend(fleet.take(pool, missing, demand.task, set(where)))
    if len(where) >= demand.replicas:
        return None
    offline = len(pool.matching) - len(pool.alive)
    if not pool.alive:
        reason = _nothing_alive(pool, demand.need)
    else:
        if not pool.heap and not where:
            # Every alive eligible proplet is full: no need to look at each of them again.
            full, blocked = len(pool.alive), 0
        else:
            full, blocked = _crowded_counts(fleet, pool, demand, where)
        if full or blocked:
            reason = _crowded(full, blocked)
        else:
            verb = "matches" if len(pool.alive) == 1 else "match"
            reason = (
                f"only {_count(len(pool.alive), 'alive proplet')} {verb} {demand.need.describe()}"
            )
        if offline:
            reason += f" ({offline} more offline)"
    if demand.replicas == 1:
        return reason
    return f"placed {len(where)} of {demand.replicas} replicas: {reason}"


def _nothing_alive(pool: _Pool, need: Requirement) -> str:
    offline = len(pool.matching)
    if not offline:
        return f"no proplet matches {need.describe()}"
    return (
        f"no alive proplet matches {need.describe()} "
        f"({_count(offline, 'matching proplet')} offline)"
    )


def _crowded(full: int, blocked: int) -> str:
    parts = []
    if full:
        verb = "is" if full == 1 else "are"
        parts.append(f"{_count(full, 'matching proplet')} {verb} at capacity")
    if blocked:
        parts.append(
            f"{_count(blocked, 'matching proplet')} {'holds' if blocked == 1 else 'hold'}"
            " a task of that name owned by someone else"
        )
    return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
