"""``propctl apply`` end to end: the CLI as a subprocess, real proplets, broker and Git.

Each test pushes manifests to a bare repository under its tmp dir, runs ``propctl`` against it
(``--repo file://...``) and checks what the proplets really did, as they report it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from schemas.messages import TaskState
from tests.e2e.support import (
    ADD,
    ADD_TASK,
    HELLO,
    HELLO_TASK,
    SLEEPY,
    TICKER_TASK,
    DesiredWatch,
    Propctl,
    actions_by_task,
    apply,
    task_manifest,
    to_yaml,
)
from tests.fleet import Fleet, module, task
from tests.gitrepo import GitRepo

pytestmark = pytest.mark.integration


# create -------------------------------------------------------------------------------------------


def test_apply_creates_tasks_that_really_run(fleet: Fleet, propctl: Propctl, repo: GitRepo) -> None:
    for proplet in ("p1", "p2", "p3"):
        fleet.start_proplet(proplet)
    repo.write("fleet/tasks.yaml", to_yaml(ADD_TASK, HELLO_TASK, TICKER_TASK))
    sha = repo.push("three tasks")

    report = apply(propctl, repo, "--wait")
    assert report["revision"] == sha
    assert report["in_sync"] is True
    assert report["dry_run"] is False
    actions = report["actions"]
    for action in actions:
        assert {"action", "task", "proplet", "outcome"} <= set(action)
    assert sorted((a["task"], a["action"], a["outcome"]) for a in actions) == [
        ("add", "create", "completed"),
        ("hello", "create", "completed"),
        ("ticker", "create", "running"),
        ("ticker", "create", "running"),
        ("ticker", "create", "running"),
    ]
    placed = {(a["task"], a["proplet"]): a["new_hash"] for a in actions}
    assert {p for t, p in placed if t == "ticker"} == {"p1", "p2", "p3"}

    rows = propctl.tasks()
    assert set(rows) == set(placed)
    for key, row in rows.items():
        assert {"name", "proplet", "state", "result", "error", "spec_hash"} <= set(row)
        assert row["spec_hash"] == placed[key]
        assert row["owner"] == "propctl"
        assert row["error"] is None
    add_proplet = next(p for t, p in placed if t == "add")
    hello_proplet = next(p for t, p in placed if t == "hello")
    assert rows[("add", add_proplet)]["state"] == "Completed"
    assert rows[("add", add_proplet)]["result"] == "42"
    assert rows[("hello", hello_proplet)]["state"] == "Completed"
    assert all(rows[("ticker", p)]["state"] == "Running" for p in ("p1", "p2", "p3"))
    # What the proplets report themselves, not only what propctl says about them.
    status = fleet.task_status(add_proplet, "add")
    assert status is not None and status.result == "42"

    proplets = {row["id"]: row for row in propctl.ok("get", "proplets", "-o", "json").json()}
    assert sorted(proplets) == ["p1", "p2", "p3"]
    for row in proplets.values():
        assert row["alive"] is True
        assert row["runtime"] == "wasmtime"
        assert row["observed_generation"] == row["desired_generation"] == 1
    assert sum(row["tasks"] for row in proplets.values()) == 5

    logs = propctl.ok("logs", "hello")
    assert (
        logs.stdout.splitlines()[0] == f"== hello on {hello_proplet}: Completed (run 1) exit code 0"
    )
    assert "hello\none\ntwo\nGREETING=hi\nfrom stdin\n" in logs.stdout
    assert "to-stderr" in logs.stderr
    assert "to-stderr" not in logs.stdout

    missing = propctl.run("logs", "nope")
    assert missing.code == 1, str(missing)
    assert "error: no result for task 'nope'" in missing.stderr


def test_failed_task_or_nowhere_to_place_exits_1(
    fleet: Fleet, propctl: Propctl, repo: GitRepo
) -> None:
    fleet.start_proplet("p1", "--label", "zone=a")
    failing = task_manifest("failing", HELLO, env={"EXIT_CODE": "3"})
    nowhere = task_manifest("nowhere", ADD, function="add", placement={"selector": {"zone": "b"}})
    repo.write("fleet/tasks.yaml", to_yaml(ADD_TASK, failing, nowhere))
    repo.push("a failing task and one that fits nowhere")

    result = propctl.run("apply", "--repo", repo.url, "--wait", "--timeout", "20s")
    assert result.code == 1, str(result)
    table = [line.split() for line in result.stdout.splitlines()]
    assert table[0] == ["ACTION", "TASK", "PROPLET", "OUTCOME", "DETAIL"]
    assert table[1][:4] == ["create", "add", "p1", "completed"]
    assert table[2][:4] == ["create", "failing", "p1", "failed"]
    assert table[3][:4] == ["pending", "nowhere", "-", "pending"]
    assert "zone: b" in result.stdout
    assert "not in sync" in result.stderr

    report = apply(propctl, repo, "--wait", code=1)
    assert report["in_sync"] is False
    actions = actions_by_task(report)
    assert (actions[("failing", "p1")]["action"], actions[("failing", "p1")]["outcome"]) == (
        "unchanged",
        "failed",
    )
    assert actions[("nowhere", None)]["outcome"] == "pending"
    rows = propctl.tasks()
    assert rows[("failing", "p1")]["state"] == "Failed"
    assert rows[("failing", "p1")]["runs"] == 1, "a failed one-shot is not run again"


# idempotence --------------------------------------------------------------------------------------


def test_second_apply_publishes_nothing_and_reruns_nothing(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, watch: DesiredWatch
) -> None:
    fleet.start_proplet("p1")
    fleet.start_proplet("p2")
    repo.write("fleet/tasks.yaml", to_yaml(ADD_TASK, HELLO_TASK, TICKER_TASK))
    repo.push("tasks")
    first = apply(propctl, repo, "--wait")
    assert first["in_sync"] is True
    published = watch.sync()
    assert sorted(p for p, _ in published) == ["p1", "p2"]
    generations = watch.generations()
    rows = propctl.tasks()

    second = apply(propctl, repo)
    assert second["in_sync"] is True
    assert {(a["action"], a["outcome"]) for a in second["actions"]} == {("unchanged", "unchanged")}
    assert len(second["actions"]) == len(first["actions"])
    third = apply(propctl, repo, "--wait")
    assert {a["action"] for a in third["actions"]} == {"unchanged"}
    assert third["in_sync"] is True

    # Labels are not part of what runs: relabelling changes nothing on the fleet either.
    relabelled = {**ADD_TASK, "metadata": {"name": "add", "labels": {"tier": "batch"}}}
    repo.write("fleet/tasks.yaml", to_yaml(relabelled, HELLO_TASK, TICKER_TASK))
    sha = repo.push("relabel add")
    fourth = apply(propctl, repo)
    assert fourth["revision"] == sha
    assert {a["action"] for a in fourth["actions"]} == {"unchanged"}

    assert watch.sync() == published, "an unchanged pass published a desired set"
    assert watch.generations() == generations
    for proplet, generation in generations.items():
        assert fleet.state(proplet).observed_generation == generation
    again = propctl.tasks()
    assert {k: (r["runs"], r["started_at"], r["spec_hash"]) for k, r in again.items()} == {
        k: (r["runs"], r["started_at"], r["spec_hash"]) for k, r in rows.items()
    }
    assert all(r["runs"] == 1 for r in again.values())


# update -------------------------------------------------------------------------------------------


def test_update_reruns_one_shot_and_restarts_daemon(
    fleet: Fleet, propctl: Propctl, repo: GitRepo
) -> None:
    fleet.start_proplet("p1")
    daemon = task_manifest("ticker", SLEEPY, daemon=True, env={"MODE": "one"})
    repo.write("fleet/tasks.yaml", to_yaml(ADD_TASK, daemon))
    repo.push("tasks")
    first = actions_by_task(apply(propctl, repo, "--wait"))
    before = propctl.tasks()
    assert before[("add", "p1")]["result"] == "42"
    assert before[("ticker", "p1")]["state"] == "Running"

    changed_add = task_manifest("add", ADD, function="add", args=["50", "50"])
    changed_daemon = task_manifest("ticker", SLEEPY, daemon=True, env={"MODE": "two"})
    repo.write("fleet/tasks.yaml", to_yaml(changed_add, changed_daemon))
    sha = repo.push("change args and env")
    report = apply(propctl, repo, "--wait")
    assert report["revision"] == sha
    assert report["in_sync"] is True
    actions = actions_by_task(report)
    assert set(actions) == {("add", "p1"), ("ticker", "p1")}
    for key, action in actions.items():
        assert action["action"] == "update"
        assert action["old_hash"] == first[key]["new_hash"]
        assert action["new_hash"] not in (None, action["old_hash"])
    assert actions[("add", "p1")]["outcome"] == "completed"
    assert actions[("ticker", "p1")]["outcome"] == "running"

    after = propctl.tasks()
    add, ticker = after[("add", "p1")], after[("ticker", "p1")]
    assert add["spec_hash"] == actions[("add", "p1")]["new_hash"]
    assert (add["state"], add["result"]) == ("Completed", "100")
    assert add["started_at"] > before[("add", "p1")]["started_at"]
    assert ticker["spec_hash"] == actions[("ticker", "p1")]["new_hash"]
    assert ticker["state"] == "Running"
    assert ticker["started_at"] > before[("ticker", "p1")]["started_at"]
    reported = fleet.task_status("p1", "ticker")
    assert reported is not None
    assert (reported.spec_hash, reported.state) == (ticker["spec_hash"], TaskState.RUNNING)
    assert [t.name for t in fleet.state("p1").tasks] == ["add", "ticker"]


# prune --------------------------------------------------------------------------------------------


def test_prune_removes_only_what_propctl_owns(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, watch: DesiredWatch
) -> None:
    fleet.start_proplet("p1")
    # Another owner's task, in a set published before propctl ever ran.
    foreign_module = module("add")
    fleet.serve(foreign_module)
    foreign = task("foreign", foreign_module, function="add", args=["1", "1"]).model_copy(
        update={"owner": "other"}
    )
    fleet.desire("p1", [foreign])
    fleet.wait_task("p1", "foreign", lambda t: t.state == TaskState.COMPLETED)

    keep = task_manifest("keep", HELLO, args=["kept"])
    gone = task_manifest("gone", SLEEPY, daemon=True)
    repo.write("fleet/keep.yaml", to_yaml(keep))
    repo.write("fleet/gone.yaml", to_yaml(gone))
    repo.push("two tasks")
    created = apply(propctl, repo, "--wait")
    assert created["in_sync"] is True
    assert sorted((a["task"], a["action"]) for a in created["actions"]) == [
        ("gone", "create"),
        ("keep", "create"),
    ]
    held = watch.latest("p1")
    assert sorted((t.name, t.owner) for t in held.tasks) == [
        ("foreign", "other"),
        ("gone", "propctl"),
        ("keep", "propctl"),
    ]

    repo.remove("fleet/gone.yaml")
    repo.push("remove gone")
    generation = watch.generations()["p1"]
    kept = actions_by_task(apply(propctl, repo))
    assert kept[("gone", "p1")]["action"] == "orphan"
    assert kept[("gone", "p1")]["outcome"] == "orphan"
    assert kept[("keep", "p1")]["action"] == "unchanged"
    assert ("foreign", "p1") not in kept
    assert watch.generations()["p1"] == generation, "without --prune nothing changes"
    assert fleet.task_status("p1", "gone") is not None
    orphan_diff = propctl.run("diff", "--repo", repo.url, "-o", "json")
    assert orphan_diff.code == 1, str(orphan_diff)
    assert [(c["action"], c["task"]) for c in orphan_diff.json()] == [("orphan", "gone")]

    pruned = apply(propctl, repo, "--prune", "--wait")
    actions = actions_by_task(pruned)
    assert actions[("gone", "p1")]["action"] == "delete"
    assert actions[("gone", "p1")]["outcome"] == "applied"
    assert ("foreign", "p1") not in actions
    assert pruned["in_sync"] is True
    latest = watch.latest("p1")
    assert latest.generation > generation
    assert sorted(t.name for t in latest.tasks) == ["foreign", "keep"]
    fleet.wait(lambda o: o.states["p1"].observed_generation == latest.generation)
    fleet.wait(lambda o: "gone" not in {t.name for t in o.states["p1"].tasks}, what="gone pruned")
    names = {t.name: t for t in fleet.state("p1").tasks}
    assert sorted(names) == ["foreign", "keep"]
    assert names["foreign"].owner == "other"
    assert (names["foreign"].state, names["foreign"].runs) == (TaskState.COMPLETED, 1)
    assert ("gone", "p1") not in propctl.tasks()

    # Another --prune pass still leaves the foreign task alone and publishes nothing.
    again = apply(propctl, repo, "--prune")
    assert {a["action"] for a in again["actions"]} == {"unchanged"}
    assert watch.latest("p1") == latest


# offline proplet ----------------------------------------------------------------------------------


def _pin_to_offline_proplet(
    fleet: Fleet, propctl: Propctl, repo: GitRepo
) -> tuple[dict[str, Any], str]:
    """Apply a task pinned to ``late``, a proplet the fleet knows but that is offline."""
    fleet.start_proplet("p1")
    late = fleet.start_proplet("late")
    late.terminate()
    fleet.wait(lambda o: o.presence.get("late") is False, what="late offline")
    pinned = task_manifest(
        "pinned", ADD, function="add", args=["40", "2"], placement={"proplet": "late"}
    )
    repo.write("fleet/tasks.yaml", to_yaml(HELLO_TASK, pinned))
    repo.push("pinned to late")
    report = apply(propctl, repo, "--wait", "--timeout", "5s")
    return report, actions_by_task(report)[("pinned", "late")]["new_hash"]


def test_task_for_an_offline_proplet_is_pending_until_it_returns(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, watch: DesiredWatch
) -> None:
    report, spec_hash = _pin_to_offline_proplet(fleet, propctl, repo)
    actions = actions_by_task(report)
    assert actions[("pinned", "late")]["action"] == "create"
    assert actions[("pinned", "late")]["outcome"] == "pending"
    assert "offline" in actions[("pinned", "late")]["detail"]
    assert actions[("hello", "p1")]["outcome"] == "completed"
    assert report["in_sync"] is False  # exit 0 all the same (checked by apply())
    generation = watch.generations()["late"]
    assert [t.name for t in watch.latest("late").tasks] == ["pinned"]

    rows = propctl.tasks()
    assert rows[("pinned", "late")]["state"] == "Unknown"
    assert rows[("pinned", "late")]["spec_hash"] == spec_hash

    # No further apply: the retained set reaches it when it comes back.
    fleet.start_proplet("late")
    fleet.wait(lambda o: o.states["late"].observed_generation == generation, what="late applied")
    status = fleet.task_status("late", "pinned")
    assert status is not None and status.spec_hash == spec_hash


def test_returning_proplet_gets_its_module_from_the_next_pass(
    fleet: Fleet, propctl: Propctl, repo: GitRepo
) -> None:
    """Git-stored modules are served while a pass runs (continuously only under serve)."""
    _pin_to_offline_proplet(fleet, propctl, repo)
    fleet.start_proplet("late")
    fleet.wait_task(
        "late", "pinned", lambda t: (t.reason or "").startswith("waiting for artifact"), timeout=5
    )
    # The next pass sends no new set, but waits until the returning proplet has its module.
    report = apply(propctl, repo)
    outcomes = {(a["task"], a["proplet"]): a["outcome"] for a in report["actions"]}
    assert outcomes[("pinned", "late")] == "unchanged"
    status = fleet.wait_task("late", "pinned", lambda t: t.state == TaskState.COMPLETED, timeout=5)
    assert status.result == "42"
    assert propctl.tasks()[("pinned", "late")]["state"] == "Completed"


# lock ---------------------------------------------------------------------------------------------


def _lock_holder(propctl: Propctl) -> str:
    locks = list((propctl.cache_dir / "locks").glob("*.lock"))
    return locks[0].read_text().strip() if locks else ""


def test_concurrent_applies_take_turns(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, watch: DesiredWatch
) -> None:
    fleet.start_proplet("p1")
    # A one-shot that sleeps 1.5 s keeps the first pass (with --wait) in the lock.
    repo.write("fleet/slow.yaml", to_yaml(task_manifest("slow", SLEEPY, args=["1500"])))
    repo.push("slow v1")
    repo.tag("v1")
    repo.write("fleet/slow.yaml", to_yaml(task_manifest("slow", SLEEPY, args=["1"])))
    repo.push("slow v2")

    common = ("--repo", repo.url, "--wait", "--timeout", "20s", "-o", "json")
    first = propctl.popen("apply", *common, "--ref", "v1")
    deadline = time.monotonic() + 15
    while _lock_holder(propctl) != str(first.pid):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first apply never took the lock"
        time.sleep(0.01)
    second = propctl.popen("apply", *common)
    second_out, second_err = second.communicate(timeout=30)
    first_out, first_err = first.communicate(timeout=30)
    assert first.returncode == 0, first_out + first_err
    assert second.returncode == 0, second_out + second_err
    assert f"another pass on this fleet is running (pid {first.pid}); waiting" in second_err
    assert "another pass" not in first_err

    one, two = json.loads(first_out), json.loads(second_out)
    # Had the second pass not waited, its set would have replaced the slow task under the
    # first pass, which would then have timed out instead of seeing it complete.
    assert [(a["action"], a["outcome"]) for a in one["actions"]] == [("create", "completed")]
    assert one["timings"]["converge"] >= 1.4
    # The second pass planned from what the first one left: an update, on the next generation.
    assert [(a["action"], a["outcome"]) for a in two["actions"]] == [("update", "completed")]
    assert two["actions"][0]["old_hash"] == one["actions"][0]["new_hash"]
    sets = watch.sync()
    assert [(p, d.generation) for p, d in sets] == [("p1", 1), ("p1", 2)]
    issued = [d.issued_at for _, d in sets]
    assert issued[0] is not None and issued[1] is not None
    assert issued[1] - issued[0] >= 1.4, "the second pass published while the first one ran"
    status = fleet.task_status("p1", "slow")
    assert status is not None and status.spec_hash == two["actions"][0]["new_hash"]
