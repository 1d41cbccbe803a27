"""The proplet agent as a real process on a real Mosquitto, fed desired sets over MQTT."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.messages import TaskState
from tests.broker import Mosquitto
from tests.fleet import Fleet, module, running_fleet, task

pytestmark = pytest.mark.integration

ADD = module("add")
HELLO = module("hello")
FOREVER = module("forever")
SPIN = module("spin")
GROW = module("grow")
RECURSE = module("recurse")
TRAP = module("trap")
NOTWASM = module("notwasm")


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path) as f:
        f.serve(ADD, HELLO, FOREVER, SPIN, GROW, RECURSE, TRAP, NOTWASM)
        yield f


def test_announces_itself_and_reports_identity(fleet: Fleet) -> None:
    p = fleet.start_proplet(
        "edge-1", "--label", "zone=a", "--label", "arch=x86", "--max-tasks", "3"
    )
    state = fleet.state("edge-1")
    assert state.runtime == "wasmtime"
    assert state.labels == {"zone": "a", "arch": "x86"}
    assert state.max_tasks == 3
    assert state.observed_generation == 0
    assert fleet.observed.announces["edge-1"] >= 1
    beats = fleet.wait(lambda o: len(o.heartbeats.get("edge-1", [])) >= 3, timeout=5)
    assert beats
    seqs = [b.seq for b in fleet.observed.heartbeats["edge-1"]]
    assert seqs == sorted(seqs)
    p.kill()  # no clean disconnect: the broker publishes the last will
    fleet.wait(lambda o: o.presence.get("edge-1") is False, timeout=10, what="last will")


def test_function_and_wasi_command_tasks_report_results(fleet: Fleet) -> None:
    fleet.start_proplet("p1")
    gen = fleet.desire(
        "p1",
        [
            task("add", ADD, function="add", args=["2", "40"]),
            task("mul", ADD, function="mul64", args=["4000000000", "3"]),
            task("hello", HELLO, args=["one", "two"], env={"GREETING": "hi"}, stdin="from stdin\n"),
            task("bad-exit", HELLO, env={"EXIT_CODE": "3"}),
        ],
    )
    assert fleet.wait_result("p1", "add").result == ["42"]
    assert fleet.wait_result("p1", "mul").result == ["12000000000"]
    hello = fleet.wait_result("p1", "hello")
    assert hello.state == TaskState.COMPLETED
    assert hello.exit_code == 0
    assert "one\ntwo\n" in hello.stdout
    assert "hi" in hello.stdout
    assert "from stdin" in hello.stdout
    assert "to-stderr" in hello.stderr
    bad = fleet.wait_result("p1", "bad-exit")
    assert (bad.state, bad.exit_code) == (TaskState.FAILED, 3)
    fleet.wait(lambda o: o.states["p1"].observed_generation == gen)
    status = fleet.wait_task("p1", "add", lambda t: t.state == TaskState.COMPLETED)
    assert (status.result, status.runs, status.restarts) == ("42", 1, 0)


def test_converges_stops_restarts_and_ignores_stale_sets(fleet: Fleet) -> None:
    fleet.start_proplet("p1")
    daemon = task("server", FOREVER, daemon=True)
    fleet.desire("p1", [daemon, task("once", ADD, function="add", args=["1", "1"])])
    fleet.wait_task("p1", "server", lambda t: t.state == TaskState.RUNNING)
    fleet.wait_result("p1", "once")

    # The spec changes: the old run is stopped and a new one started.
    changed = task("server", FOREVER, daemon=True, env={"V": "2"})
    gen = fleet.desire("p1", [changed, task("once", ADD, function="add", args=["1", "1"])])
    status = fleet.wait_task(
        "p1", "server", lambda t: t.spec_hash == changed.spec_hash and t.state == "Running"
    )
    assert status.runs == 1
    fleet.wait(lambda o: o.states["p1"].observed_generation == gen)

    # An older generation is ignored.
    fleet.desire("p1", [], generation=gen - 1)
    time.sleep(0.5)
    assert fleet.state("p1").observed_generation == gen
    assert fleet.task_status("p1", "server") is not None

    # Removed from the set: stopped quickly, its retained result cleared.
    started = time.monotonic()
    fleet.desire("p1", [], generation=gen + 1)
    fleet.wait(lambda o: not o.states["p1"].tasks, timeout=5, what="tasks removed")
    assert time.monotonic() - started < 2.0
    fleet.wait(lambda o: o.results.get(("p1", "once"), "x") is None, what="result cleared")


def test_one_shot_runs_once_per_spec_across_restarts(fleet: Fleet) -> None:
    p = fleet.start_proplet("p1")
    fleet.desire("p1", [task("once", ADD, function="add", args=["1", "2"])])
    fleet.wait_task("p1", "once", lambda t: t.state == TaskState.COMPLETED)
    assert p.terminate() == 0
    fleet.start_proplet("p1")
    time.sleep(1.0)
    status = fleet.wait_task("p1", "once", lambda t: t.state == TaskState.COMPLETED)
    assert (status.runs, status.restarts) == (1, 0)


def test_interrupted_one_shot_runs_again_with_restart_count(fleet: Fleet) -> None:
    p = fleet.start_proplet("p1")
    fleet.desire("p1", [task("long", FOREVER, timeout_ms=60_000)])
    fleet.wait_task("p1", "long", lambda t: t.state == TaskState.RUNNING)
    p.kill()
    fleet.start_proplet("p1")
    status = fleet.wait_task(
        "p1", "long", lambda t: t.state == TaskState.RUNNING and t.restarts == 1
    )
    assert status.runs == 2


def test_keeps_tasks_when_the_broker_loses_retained_messages(fleet: Fleet) -> None:
    p = fleet.start_proplet("p1")
    fleet.desire("p1", [task("server", FOREVER, daemon=True)])
    fleet.wait_task("p1", "server", lambda t: t.state == TaskState.RUNNING)
    fleet.observed.states.clear()
    fleet.mosquitto.restart()  # retained desired set and state are gone
    status = fleet.wait_task(
        "p1", "server", lambda t: t.state == TaskState.RUNNING, timeout=15, proplet=p
    )
    assert (status.runs, status.restarts) == (1, 0)  # neither lost nor started twice
    assert fleet.state("p1").observed_generation == 1


def test_offline_proplet_converges_when_it_returns(fleet: Fleet) -> None:
    fleet.desire("late", [task("add", ADD, function="add", args=["5", "5"])])
    fleet.start_proplet("late")
    assert fleet.wait_result("late", "add").result == ["10"]


@pytest.mark.parametrize(
    ("mod", "fields", "reason"),
    [
        (SPIN, {"function": "spin", "timeout_ms": 300}, "timed out after 300 ms"),
        (SPIN, {"function": "spin", "fuel": 100_000}, "fuel"),
        (GROW, {"function": "grow", "memory": 2 * 1024 * 1024}, "memory limit"),
        (RECURSE, {"function": "recurse", "args": ["1"]}, "stack overflow"),
        (TRAP, {"function": "boom"}, "unreachable"),
        (NOTWASM, {}, "not a WebAssembly module"),
        (ADD, {"function": "missing"}, "not exported"),
        (ADD, {"function": "add", "args": ["x", "1"]}, "not a valid i32"),
    ],
)
def test_bad_modules_fail_with_a_reason_and_the_agent_keeps_serving(
    fleet: Fleet, mod: object, fields: dict[str, object], reason: str
) -> None:
    fleet.start_proplet("p1")
    fleet.desire("p1", [task("bad", mod, **fields)])  # type: ignore[arg-type]
    result = fleet.wait_result("p1", "bad", timeout=15)
    assert result.state == TaskState.FAILED
    assert result.error is not None and reason in result.error
    fleet.desire("p1", [task("good", ADD, function="add", args=["1", "1"])])
    assert fleet.wait_result("p1", "good").result == ["2"]


def test_capacity_keeps_the_excess_pending(fleet: Fleet) -> None:
    fleet.start_proplet("p1", "--max-tasks", "2")
    fleet.desire("p1", [task(f"d{i}", FOREVER, daemon=True) for i in range(3)])
    fleet.wait(
        lambda o: (
            [t.state for t in o.states["p1"].tasks]
            == [TaskState.RUNNING, TaskState.RUNNING, TaskState.PENDING]
        )
    )
    pending = fleet.task_status("p1", "d2")
    assert pending is not None and pending.reason is not None and "free slot" in pending.reason
    fleet.desire("p1", [task("d1", FOREVER, daemon=True), task("d2", FOREVER, daemon=True)])
    fleet.wait_task("p1", "d2", lambda t: t.state == TaskState.RUNNING)


def test_a_clean_stop_marks_the_proplet_offline_before_it_exits(fleet: Fleet) -> None:
    # A clean disconnect sends no last will: the agent must publish its offline presence itself,
    # and have it acknowledged, before the process ends (even with a task spinning).
    p = fleet.start_proplet("p1")
    fleet.desire("p1", [task("server", FOREVER, daemon=True)])
    fleet.wait_task("p1", "server", lambda t: t.state == TaskState.RUNNING)
    assert p.terminate() == 0
    fleet.wait(lambda o: o.presence.get("p1") is False, timeout=1.0, what="offline presence")
