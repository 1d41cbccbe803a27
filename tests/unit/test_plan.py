"""Planning: placement, the sets that change, actions, generations and the spec hash."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from reconciler.desired import DesiredState, ResolvedTask, spec_hash, wire_task
from reconciler.observed import ObservedProplet, ObservedState
from reconciler.plan import Plan, plan
from schemas.manifests import TaskSpec
from schemas.messages import DesiredSet, DesiredTask, ReportedState, Runtime, decode

DIGEST = "sha256:" + "ab" * 32


def task(
    name: str, digest: str | None = DIGEST, image: str | None = None, **spec: Any
) -> ResolvedTask:
    module = {"image": image} if image else {"file": "modules/m.wasm"}
    model = TaskSpec.model_validate({"module": module, **spec})
    size = 100 if digest is not None and image is None else None
    return ResolvedTask(name, {}, model, digest, size, image, "tasks.yaml", 1)


def desired(*tasks: ResolvedTask) -> DesiredState:
    return DesiredState("rev", tuple(sorted(tasks, key=lambda t: t.manifest_name)))


def proplet(
    pid: str,
    runtime: str | None = "wasmtime",
    labels: dict[str, str] | None = None,
    max_tasks: int = 4,
    alive: bool = True,
    holds: list[DesiredTask] | None = None,
    generation: int = 1,
    observed: int = 0,
) -> ObservedProplet:
    reported = (
        None
        if runtime is None
        else ReportedState(
            proplet=pid,
            runtime=Runtime(runtime),
            labels=labels or {},
            max_tasks=max_tasks,
            observed_generation=observed,
            ts=0.0,
        )
    )
    held = None if holds is None else DesiredSet(generation=generation, tasks=holds)
    return ObservedProplet.of(pid, reported=reported, desired=held, alive=alive)


def fleet(*proplets: ObservedProplet) -> ObservedState:
    return ObservedState.of(proplets)


def held(name: str, owner: str = "propctl", **spec: Any) -> DesiredTask:
    """The wire form of a task as it would sit in a retained set."""
    return wire_task(task(name, **spec), owner)


def applied(observed: ObservedState, result: Plan) -> ObservedState:
    """The snapshot after converging: new sets retained (through the wire) and observed."""
    proplets = []
    for pid, current in observed.proplets.items():
        new = result.sets.get(pid)
        if new is None:
            proplets.append(current)
            continue
        retained = decode(DesiredSet, new.encode())
        reported = current.reported
        if reported is not None:
            reported = reported.model_copy(update={"observed_generation": new.generation})
        proplets.append(dataclasses.replace(current, desired=retained, reported=reported))
    return fleet(*proplets)


def placements(result: Plan) -> dict[str, tuple[str, ...]]:
    found: dict[str, list[str]] = {}
    for action in result.actions:
        if action.kind in ("create", "update", "unchanged") and action.proplet is not None:
            found.setdefault(action.task, []).append(action.proplet)
    return {name: tuple(sorted(where)) for name, where in sorted(found.items())}


def pending(result: Plan) -> dict[str, str | None]:
    return {a.task: a.reason for a in result.actions if a.kind == "pending"}


def kinds(result: Plan) -> list[tuple[str, str, str | None]]:
    return [(a.kind, a.task, a.proplet) for a in result.actions]


@pytest.mark.parametrize(
    ("case", "tasks", "proplets", "where", "waiting"),
    [
        ("create on empty fleet", [task("a")], [proplet("p1"), proplet("p2")], {"a": ("p1",)}, {}),
        (
            "spread evenly, ties by id",
            [task("a"), task("b"), task("c"), task("d")],
            [proplet("p1"), proplet("p2")],
            {"a": ("p1",), "b": ("p2",), "c": ("p1",), "d": ("p2",)},
            {},
        ),
        (
            "replicas on distinct proplets, least loaded first",
            [task("a", placement={"replicas": 2}), task("b", placement={"replicas": 2})],
            [proplet("p1"), proplet("p2"), proplet("p3")],
            {"a": ("p1", "p2"), "b": ("p1", "p3")},
            {},
        ),
        (
            "replicas only partly placed",
            [task("a", placement={"replicas": 3})],
            [proplet("p1"), proplet("p2"), proplet("p3", alive=False)],
            {"a": ("p1", "p2")},
            {
                "a": "placed 2 of 3 replicas: only 2 alive proplets match runtime=any"
                " (1 more offline)"
            },
        ),
        (
            "spread all goes to every alive matching proplet",
            [task("a", placement={"spread": "all", "selector": {"zone": "a"}})],
            [
                proplet("p1", labels={"zone": "a"}),
                proplet("p2", labels={"zone": "a", "tier": "edge"}),
                proplet("p3", labels={"zone": "a"}, alive=False),
                proplet("p4", labels={"zone": "b"}),
            ],
            {"a": ("p1", "p2")},
            {},
        ),
        (
            "spread all at capacity somewhere",
            [task("a"), task("b", placement={"spread": "all"})],
            [proplet("p1", max_tasks=1), proplet("p2", max_tasks=1), proplet("p3", max_tasks=2)],
            {"a": ("p3",), "b": ("p1", "p2", "p3")},
            {},
        ),
        (
            "spread all where one proplet is full",
            [task("b", placement={"spread": "all"})],
            [proplet("p1", max_tasks=1, holds=[held("x", owner="ops")]), proplet("p2")],
            {"b": ("p2",)},
            {"b": "on 1 of 2 alive matching proplets: 1 matching proplet is at capacity"},
        ),
        (
            "the only room is where another owner runs the same name",
            [task("a")],
            [
                proplet("p1", holds=[held("a", owner="ops")]),
                proplet("p2", max_tasks=1, holds=[held("x", owner="ops")]),
            ],
            {},
            {
                "a": "1 matching proplet is at capacity, 1 matching proplet holds a task of that"
                " name owned by someone else"
            },
        ),
        (
            "runtime mismatch",
            [task("a", placement={"runtime": "wamr"})],
            [proplet("p1"), proplet("p2")],
            {},
            {"a": "no proplet matches runtime=wamr"},
        ),
        (
            "runtime any matches wamr",
            [task("a")],
            [proplet("p1", runtime="wamr")],
            {"a": ("p1",)},
            {},
        ),
        (
            "matching proplet offline",
            [task("a", placement={"runtime": "wamr", "selector": {"zone": "a"}})],
            [
                proplet("p1", runtime="wamr", labels={"zone": "a"}, alive=False),
                proplet("p2", runtime="wamr", labels={"zone": "b"}),
                proplet("p3", runtime="wasmtime", labels={"zone": "a"}),
            ],
            {},
            {
                "a": "no alive proplet matches runtime=wamr selector {zone: a}"
                " (1 matching proplet offline)"
            },
        ),
        (
            "selector picks the labelled proplet",
            [task("a", placement={"selector": {"zone": "b", "tier": "edge"}})],
            [
                proplet("p1", labels={"zone": "b"}),
                proplet("p2", labels={"zone": "b", "tier": "edge", "x": "y"}),
            ],
            {"a": ("p2",)},
            {},
        ),
        (
            "capacity exhausted",
            [task("a"), task("b"), task("c"), task("d")],
            [proplet(p, max_tasks=1) for p in ("p1", "p2", "p3")],
            {"a": ("p1",), "b": ("p2",), "c": ("p3",)},
            {"d": "3 matching proplets are at capacity"},
        ),
        (
            "pin to an offline proplet is written to its set",
            [task("a", placement={"proplet": "p3"})],
            [proplet("p1"), proplet("p3", alive=False)],
            {"a": ("p3",)},
            {},
        ),
        (
            "pinned tasks are placed before others",
            [task("a"), task("b", placement={"proplet": "p1"})],
            [proplet("p1", max_tasks=1), proplet("p2", max_tasks=1)],
            {"a": ("p2",), "b": ("p1",)},
            {},
        ),
        (
            "pin with the wrong runtime",
            [task("a", placement={"proplet": "p1", "runtime": "wamr"})],
            [proplet("p1")],
            {},
            {"a": "pinned proplet p1 runs wasmtime, not wamr"},
        ),
        (
            "pin without the selector's labels",
            [task("a", placement={"proplet": "p1", "selector": {"zone": "a"}})],
            [proplet("p1")],
            {},
            {"a": "pinned proplet p1 does not match runtime=any selector {zone: a}"},
        ),
        (
            "pin to an unknown proplet",
            [task("a", placement={"proplet": "p9"})],
            [proplet("p1")],
            {},
            {"a": "pinned proplet p9 is not known"},
        ),
        (
            "pin to a full proplet",
            [task("a", placement={"proplet": "p1"}), task("b", placement={"proplet": "p1"})],
            [proplet("p1", max_tasks=1)],
            {"a": ("p1",)},
            {"b": "pinned proplet p1 is at capacity (1 task)"},
        ),
        (
            "no proplets at all",
            [task("a")],
            [],
            {},
            {"a": "no proplet matches runtime=any"},
        ),
        (
            "image not resolved yet",
            [task("a", digest=None, image="ghcr.io/acme/a:1")],
            [proplet("p1")],
            {},
            {"a": "module image ghcr.io/acme/a:1 is not resolved to a digest yet"},
        ),
        (
            "proplet that never reported gets nothing new",
            [task("a")],
            [proplet("p1", runtime=None)],
            {},
            {"a": "no proplet matches runtime=any"},
        ),
    ],
)
def test_placement(
    case: str,
    tasks: list[ResolvedTask],
    proplets: list[ObservedProplet],
    where: dict[str, tuple[str, ...]],
    waiting: dict[str, str],
) -> None:
    result = plan(desired(*tasks), fleet(*proplets), prune=False)
    assert placements(result) == where, case
    assert pending(result) == waiting, case
    expected_sets = {p for placed in where.values() for p in placed}
    assert set(result.sets) == expected_sets, case


def test_sets_hold_wire_tasks_with_owner_and_first_generation() -> None:
    result = plan(desired(task("a", args=["x"])), fleet(proplet("p1", holds=None)), prune=False)
    assert list(result.sets) == ["p1"]
    new = result.sets["p1"]
    assert new.generation == 1
    assert new.issuer == "propctl"
    assert [(t.name, t.owner, t.args, t.digest, t.size) for t in new.tasks] == [
        ("a", "propctl", ["x"], DIGEST, 100)
    ]
    assert result.actions[0].new_hash == new.tasks[0].spec_hash


def test_apply_twice_changes_nothing() -> None:
    tasks = desired(
        task("a", placement={"replicas": 2}),
        task("b", placement={"spread": "all"}),
        task("c", placement={"proplet": "p3"}),
        task("d", placement={"runtime": "wamr"}),
        task("e", daemon=True, env={"B": "2", "A": "1"}, limits={"memory": "1Mi"}),
    )
    observed = fleet(proplet("p1"), proplet("p2", labels={"zone": "a"}), proplet("p3", alive=False))
    first = plan(tasks, observed, prune=True)
    assert set(first.sets) == {"p1", "p2", "p3"}
    second = plan(tasks, applied(observed, first), prune=True)
    assert second.sets == {}
    assert {a.kind for a in second.actions} == {"unchanged", "pending"}
    assert placements(second) == placements(first)
    assert pending(second) == pending(first) == {"d": "no proplet matches runtime=wamr"}


def test_stable_when_a_proplet_joins() -> None:
    tasks = desired(task("a"), task("b"), task("c"))
    observed = fleet(proplet("p1"), proplet("p2"))
    first = plan(tasks, observed, prune=False)
    assert placements(first) == {"a": ("p1",), "b": ("p2",), "c": ("p1",)}
    grown = fleet(*applied(observed, first).proplets.values(), proplet("p0"))
    more = desired(*tasks.tasks, task("d"))
    second = plan(more, grown, prune=False)
    assert placements(second) == {"a": ("p1",), "b": ("p2",), "c": ("p1",), "d": ("p0",)}
    assert list(second.sets) == ["p0"]
    assert kinds(second) == [
        ("unchanged", "a", "p1"),
        ("unchanged", "b", "p2"),
        ("unchanged", "c", "p1"),
        ("create", "d", "p0"),
    ]


def test_spec_change_updates_in_place_with_new_hash_and_generation() -> None:
    observed = fleet(proplet("p1"), proplet("p2"))
    first = plan(desired(task("a"), task("b")), observed, prune=False)
    after = applied(observed, first)
    second = plan(desired(task("a", args=["--fast"]), task("b")), after, prune=False)
    old = first.sets["p1"].tasks[0].spec_hash
    new = second.sets["p1"].tasks[0].spec_hash
    assert old != new
    assert [a for a in second.actions if a.task == "a"] == [
        second.actions[0],
    ]
    action = second.actions[0]
    assert (action.kind, action.proplet, action.reason, action.old_hash, action.new_hash) == (
        "update",
        "p1",
        "spec changed",
        old,
        new,
    )
    assert list(second.sets) == ["p1"]
    assert second.sets["p1"].generation == first.sets["p1"].generation + 1 == 2


@pytest.mark.parametrize(
    ("written", "observed", "expected"),
    [
        (None, 0, 1),
        (3, 5, 6),  # the proplet saw a newer set than the one retained (lost retained message)
        (7, 2, 8),  # another host wrote sets the proplet has not applied yet
        (None, 4, 5),  # the retained set was cleared, the proplet remembers
        (4, 4, 5),
    ],
)
def test_generation_derived_from_snapshot(
    written: int | None, observed: int, expected: int
) -> None:
    holds = None if written is None else []
    current = proplet("p1", holds=holds, generation=written or 1, observed=observed)
    result = plan(desired(task("a")), fleet(current), prune=False)
    assert result.sets["p1"].generation == expected


@pytest.mark.parametrize(
    ("prune", "expected_kinds", "set_tasks"),
    [
        (False, [("orphan", "old", "p1"), ("unchanged", "keep", "p1")], None),
        (True, [("unchanged", "keep", "p1"), ("delete", "old", "p1")], ["keep"]),
    ],
)
def test_removed_from_git_is_pruned_only_with_prune(
    prune: bool, expected_kinds: list[tuple[str, str, str]], set_tasks: list[str] | None
) -> None:
    observed = fleet(proplet("p1", holds=[held("keep"), held("old")], generation=5))
    result = plan(desired(task("keep")), observed, prune=prune)
    assert sorted(kinds(result)) == sorted(expected_kinds)
    if set_tasks is None:
        assert result.sets == {}
    else:
        assert [t.name for t in result.sets["p1"].tasks] == set_tasks
        assert result.sets["p1"].generation == 6
    other = next(a for a in result.actions if a.task == "old")
    assert other.old_hash == held("old").spec_hash
    assert other.reason == (
        "removed from Git" if prune else "removed from Git; kept because prune is off"
    )


def test_foreign_tasks_are_untouched_and_count_against_capacity() -> None:
    foreign = held("x", owner="ops", args=["theirs"])
    clash = held("a", owner="ops")
    observed = fleet(
        proplet("p1", max_tasks=2, holds=[foreign, held("gone")]),
        proplet("p2", max_tasks=2, holds=[clash]),
        proplet("p3", max_tasks=2),
    )
    result = plan(desired(task("a"), task("b"), task("c")), observed, prune=True)
    # p1 has room for one of ours next to x; p2 already runs another owner's "a".
    assert placements(result) == {"a": ("p3",), "b": ("p1",), "c": ("p2",)}
    assert [t.name for t in result.sets["p1"].tasks] == ["b", "x"]
    assert result.sets["p1"].tasks[1] == foreign
    assert [(t.name, t.owner) for t in result.sets["p2"].tasks] == [("a", "ops"), ("c", "propctl")]
    assert not [a for a in result.actions if a.task == "x" or (a.proplet == "p2" and a.task == "a")]


def test_other_owners_view_of_the_same_sets() -> None:
    observed = fleet(proplet("p1", holds=[held("a"), held("x", owner="ops")]))
    result = plan(desired(), observed, prune=True, owner="ops")
    assert kinds(result) == [("delete", "x", "p1")]
    assert [(t.name, t.owner) for t in result.sets["p1"].tasks] == [("a", "propctl")]


def test_scale_down_leaves_the_most_loaded_first() -> None:
    observed = fleet(
        proplet("p1", holds=[held("a", placement={"replicas": 3})]),
        proplet("p2", holds=[held("a", placement={"replicas": 3}), held("x", owner="ops")]),
        proplet("p3", holds=[held("a", placement={"replicas": 3}), held("y", owner="ops")]),
    )
    result = plan(desired(task("a", placement={"replicas": 1})), observed, prune=False)
    assert kinds(result) == [
        ("unchanged", "a", "p1"),
        ("delete", "a", "p2"),
        ("delete", "a", "p3"),
    ]
    assert {a.reason for a in result.actions if a.kind == "delete"} == {"scaled down to 1 replica"}


def test_placement_change_moves_the_task() -> None:
    observed = fleet(
        proplet("p1", labels={"zone": "a"}, holds=[held("a")]),
        proplet("p2", labels={"zone": "b"}),
    )
    result = plan(desired(task("a", placement={"selector": {"zone": "b"}})), observed, prune=False)
    assert kinds(result) == [("delete", "a", "p1"), ("create", "a", "p2")]
    assert result.actions[0].reason == "proplet p1 no longer matches runtime=any selector {zone: b}"
    assert [t.name for t in result.sets["p1"].tasks] == []
    assert [t.name for t in result.sets["p2"].tasks] == ["a"]


def test_over_capacity_sheds_from_the_end_and_replaces() -> None:
    observed = fleet(proplet("p1", max_tasks=1, holds=[held("a"), held("b")]), proplet("p2"))
    result = plan(desired(task("a"), task("b")), observed, prune=False)
    assert kinds(result) == [("unchanged", "a", "p1"), ("delete", "b", "p1"), ("create", "b", "p2")]
    assert result.actions[1].reason == "proplet p1 is over capacity (1 task)"


def test_offline_and_unreported_holders_keep_their_tasks() -> None:
    observed = fleet(
        proplet("p1", alive=False, holds=[held("a")]),
        proplet("p2", runtime=None, holds=[held("b", placement={"runtime": "wamr"})]),
        proplet("p3"),
    )
    tasks = desired(task("a"), task("b", placement={"runtime": "wamr"}), task("c"))
    result = plan(tasks, observed, prune=False)
    assert placements(result) == {"a": ("p1",), "b": ("p2",), "c": ("p3",)}
    assert list(result.sets) == ["p3"]


def test_spread_keeps_offline_holders_and_adds_new_alive_ones() -> None:
    observed = fleet(
        proplet("p1", alive=False, holds=[held("s", placement={"spread": "all"})]),
        proplet("p2"),
        proplet("p3", alive=False),
    )
    result = plan(desired(task("s", placement={"spread": "all"})), observed, prune=False)
    assert kinds(result) == [("unchanged", "s", "p1"), ("create", "s", "p2")]


def test_unresolved_image_keeps_what_proplets_hold() -> None:
    before = held("a")
    observed = fleet(proplet("p1", holds=[before]))
    tasks = desired(task("a", digest=None, image="ghcr.io/acme/a:2"))
    result = plan(tasks, observed, prune=True)
    assert kinds(result) == [("pending", "a", None)]
    assert result.sets == {}


def test_plan_is_deterministic() -> None:
    tasks = [task(f"t{i}", placement={"replicas": 1 + i % 3}) for i in range(30)]
    proplets = [proplet(f"p{i}", max_tasks=3 + i % 2) for i in range(12)]
    one = plan(desired(*tasks), fleet(*proplets), prune=True)
    shuffled = DesiredState("rev", tuple(reversed(desired(*tasks).tasks)))
    two = plan(shuffled, fleet(*reversed(proplets)), prune=True)
    assert one == two
    assert one.actions == tuple(
        sorted(one.actions, key=lambda a: (a.task, a.proplet or "", a.kind))
    )


def test_duplicate_task_names_are_refused() -> None:
    with pytest.raises(ValueError, match="two tasks with the same name"):
        plan(DesiredState("rev", (task("a"), task("a"))), fleet(), prune=False)


BASE = task("a", function="run", args=["1"], env={"K": "v"}, limits={"memory": "1Mi"})


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"spec": {"args": ["2"]}}, False),
        ({"spec": {"env": {"K": "w"}}}, False),
        ({"spec": {"function": "main"}}, False),
        ({"spec": {"function": None}}, False),
        ({"spec": {"stdin": "in"}}, False),
        ({"spec": {"daemon": True}}, False),
        ({"spec": {"limits": {"memory": "2Mi"}}}, False),
        ({"spec": {"limits": {"memory": "1Mi", "timeout": "1s"}}}, False),
        ({"spec": {"limits": {"memory": "1Mi", "fuel": 10}}}, False),
        ({"digest": "sha256:" + "cd" * 32}, False),
        ({"size": 101}, False),
        ({"spec": {"placement": {"replicas": 3, "selector": {"zone": "a"}}}}, True),
        ({"labels": {"team": "x"}}, True),
        ({"source_file": "moved.yaml", "line": 40}, True),
        ({"spec": {"env": {"K": "v"}}}, True),
    ],
)
def test_spec_hash_changes_only_with_what_runs(change: dict[str, Any], same: bool) -> None:
    spec_change = change.pop("spec", {})
    model = BASE.spec.model_copy(
        update={
            key: (
                BASE.spec.limits.model_validate(value)
                if key == "limits"
                else BASE.spec.placement.model_validate(value)
                if key == "placement"
                else value
            )
            for key, value in spec_change.items()
        }
    )
    other = dataclasses.replace(BASE, spec=model, **change)
    assert (wire_task(other, "propctl").spec_hash == wire_task(BASE, "propctl").spec_hash) is same


def test_spec_hash_ignores_name_owner_and_env_order() -> None:
    one = wire_task(task("a", env={"A": "1", "B": "2"}), "propctl")
    two = wire_task(task("b", env={"B": "2", "A": "1"}), "someone")
    assert one.spec_hash == two.spec_hash
    assert len(one.spec_hash) == 16
    assert spec_hash(one) == one.spec_hash
    assert spec_hash(decode(DesiredTask, one.encode())) == one.spec_hash


def test_tasks_move_off_a_lost_proplet_but_not_off_one_that_blinked() -> None:
    tasks = desired(
        task("web"),
        task("pinned", placement={"proplet": "a"}),
        task("everywhere", placement={"spread": "all"}),
    )
    holds_a = [held("web"), held("pinned", placement={"proplet": "a"}),
               held("everywhere", placement={"spread": "all"})]  # fmt: skip
    blinked = fleet(
        proplet("a", alive=False, holds=holds_a),
        proplet("b", holds=[held("everywhere", placement={"spread": "all"})]),
    )
    assert plan(tasks, blinked, prune=False).sets == {}  # offline, not lost: nothing moves

    lost = fleet(dataclasses.replace(blinked.proplets["a"], lost=True), blinked.proplets["b"])
    result = plan(tasks, lost, prune=False)
    assert placements(result) == {
        "everywhere": ("a", "b"),  # its own instance on every proplet: nothing to move
        "pinned": ("a",),  # waits for its proplet (shown Unknown meanwhile)
        "web": ("b",),
    }
    (moved,) = [a for a in result.actions if a.kind == "delete"]
    assert (moved.task, moved.proplet) == ("web", "a")
    assert moved.reason == "proplet a is lost (offline past the bound); moved"
    # The lost proplet's retained set no longer holds the task: it stops it when it returns.
    assert [t.name for t in result.sets["a"].tasks] == ["everywhere", "pinned"]
    assert [t.name for t in result.sets["b"].tasks] == ["everywhere", "web"]

    # Back again: it stays where it moved (no churn).
    returned = applied(lost, result)
    back = fleet(
        dataclasses.replace(returned.proplets["a"], lost=False, alive=True),
        returned.proplets["b"],
    )
    assert plan(tasks, back, prune=False).sets == {}
