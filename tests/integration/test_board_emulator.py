"""The board emulator: the real board core (libpropeller_board.so) on a real Mosquitto.

Each test runs emulated boards in this process (``zephyr.host.emulator.Board``), with Wasm on
wasmtime under a board's limits, and plays the reconciler with ``tests.fleet.Fleet``: it
publishes desired sets, serves modules through the reconciler's artifact server, and decodes
everything the boards publish with the ``schemas`` models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import wasmtime

from schemas.connection import broker_settings
from schemas.messages import (
    Announce,
    ArtifactOffer,
    ArtifactRequest,
    DesiredSet,
    Heartbeat,
    Presence,
    ReportedState,
    Runtime,
    TaskResult,
    TaskState,
    chunk_count,
    decode,
)
from schemas.topics import Namespace
from tests.broker import ClientFactory, Mosquitto, ProbeClient, connect_client
from tests.fleet import Fleet, Module, Observed, module, pad_module, running_fleet, task
from zephyr.host.emulator import Board, BoardConfig
from zephyr.host.library import Library, load
from zephyr.host.wasm import DEFAULT_MEMORY, Call, Executor, RunResult

pytestmark = pytest.mark.integration

NS = Namespace()
KiB = 1024


# -- modules ----------------------------------------------------------------------------------


def padded(mod: Module, size: int, seed: int = 7) -> Module:
    """``mod`` grown to exactly ``size`` bytes (same code)."""
    return Module(f"{mod.name}-{size}", pad_module(mod.data, size, seed))


HOST_API_WAT = """
(module
  (import "propeller" "log" (func $log (param i32 i32)))
  (import "propeller" "now_ms" (func $now (result i64)))
  (import "propeller" "sleep_ms" (func $sleep (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hello from the board")
  ;; nap(ms): log a line, sleep, return how long the sleep took by the board's clock
  (func (export "nap") (param i32) (result i64) (local $t i64)
    (call $log (i32.const 0) (i32.const 20))
    (local.set $t (call $now))
    (call $sleep (local.get 0))
    (i64.sub (call $now) (local.get $t)))
  ;; a log call whose bytes lie outside linear memory
  (func (export "stray") (call $log (i32.const 65530) (i32.const 100))))
"""


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library() -> Library:
    return load()


@pytest.fixture(scope="module")
def executor() -> Iterator[Executor]:
    shared = Executor()
    yield shared
    shared.close()


class Boards:
    """Emulated boards in this process, each stopped at teardown."""

    def __init__(
        self, broker: Mosquitto, executor: Executor, library: Library, fleet: Fleet | None
    ) -> None:
        self.broker = broker
        self.executor = executor
        self.library = library
        self.fleet = fleet
        self.made: list[Board] = []

    def __call__(self, proplet_id: str = "board-1", **config: Any) -> Board:
        """A started board, once connected (and, with a fleet, once it reported its state)."""
        config.setdefault("heartbeat_s", 0.5)
        board = Board(
            BoardConfig(proplet_id, **config),
            broker_settings(self.broker.url),
            executor=self.executor,
            library=self.library,
        )
        self.made.append(board)
        board.start()
        assert board.wait_connected(5), f"{proplet_id} did not connect"
        if self.fleet is not None:
            self.fleet.wait(
                lambda o: o.presence.get(proplet_id) is True and proplet_id in o.states,
                what=f"{proplet_id} online",
            )
        return board

    def close(self) -> None:
        for board in self.made:
            board.stop()


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path / "fleet") as f:
        yield f


@pytest.fixture
def boards(
    broker: Mosquitto, executor: Executor, library: Library, fleet: Fleet
) -> Iterator[Boards]:
    made = Boards(broker, executor, library, fleet)
    try:
        yield made
    finally:
        made.close()


def requests_on(client: ProbeClient) -> Callable[[float], ArtifactRequest]:
    """A reader of the artifact requests ``client`` receives (it must subscribe first)."""

    def next_request(timeout: float = 5.0) -> ArtifactRequest:
        deadline = time.monotonic() + timeout
        while True:
            msg = client.next_message(max(0.0, deadline - time.monotonic()))
            if msg.topic == NS.artifact_request():
                return decode(ArtifactRequest, bytes(msg.payload))

    return next_request


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.001)


# -- joining the fleet ------------------------------------------------------------------------


def test_a_board_announces_itself_as_a_wamr_proplet_and_leaves_cleanly(
    broker: Mosquitto, executor: Executor, library: Library, mqtt_client: ClientFactory
) -> None:
    probe = mqtt_client(broker)
    probe.subscribe_wait(f"{NS.proplet_root('board-1')}/+")
    boards = Boards(broker, executor, library, None)
    try:
        board = boards("board-1", labels={"zone": "lab"}, heartbeat_s=0.2)
        seen: dict[str, list[bytes]] = {}

        def collect() -> bool:
            for msg in probe.drain():
                seen.setdefault(msg.topic.rsplit("/", 1)[1], []).append(bytes(msg.payload))
            return len(seen.get("heartbeat", [])) >= 2 and {"announce", "state"} <= set(seen)

        wait_until(collect, what="announce, state and two heartbeats")

        announce = decode(Announce, seen["announce"][0])
        assert announce.proplet == "board-1"
        assert announce.runtime is Runtime.WAMR
        assert announce.labels == {"zone": "lab"}
        assert announce.max_tasks == library.sizes.max_tasks
        assert announce.heartbeat_s == pytest.approx(0.2)
        assert decode(Presence, seen["presence"][0]) == Presence(proplet="board-1", online=True)
        state = decode(ReportedState, seen["state"][0])
        assert (state.runtime, state.tasks, state.observed_generation) == (Runtime.WAMR, [], 0)
        beats = [decode(Heartbeat, payload) for payload in seen["heartbeat"]]
        assert [b.seq for b in beats[:2]] == [1, 2]
        assert beats[0].interval_s == pytest.approx(0.2)
        assert abs(beats[0].ts - time.time()) < 5

        # The will, as the core encodes it, is what the broker publishes for a dropped link.
        assert board.will_topic == NS.presence("board-1")
        assert decode(Presence, board.will_payload) == Presence(proplet="board-1", online=False)
        board.sever()
        offline = probe.wait_for_topic(NS.presence("board-1"))
        assert offline.payload == board.will_payload
        # ...and the board comes back by itself: online again, announced again.
        again = probe.wait_for_topic(NS.presence("board-1"))
        assert decode(Presence, bytes(again.payload)).online is True
        announce_again = probe.wait_for_topic(NS.announce("board-1"))
        assert decode(Announce, bytes(announce_again.payload)) == announce
        wait_until(lambda: board.connects == 2, what="a second connection")

        board.stop()
        after = mqtt_client(broker)
        after.subscribe_wait(NS.presence("board-1"))
        retained = after.wait_for_topic(NS.presence("board-1"))
        assert retained.retain is True
        assert decode(Presence, bytes(retained.payload)) == Presence(
            proplet="board-1", online=False
        )
    finally:
        boards.close()


# -- running tasks ----------------------------------------------------------------------------


def test_a_function_task_is_fetched_in_small_chunks_run_and_reported(
    broker: Mosquitto, fleet: Fleet, boards: Boards, library: Library,
    mqtt_client: ClientFactory,
) -> None:  # fmt: skip
    probe = mqtt_client(broker)
    probe.subscribe_wait(NS.artifact_request())
    next_request = requests_on(probe)
    add = padded(module("add"), 10 * KiB)
    fleet.serve(add)
    # Slices of 7 bytes: every message reaches the core in many small pieces.
    board = boards("board-1", slice_bytes=7)

    generation = fleet.desire("board-1", [task("sum", add, function="add", args=["2", "40"])])

    result = fleet.wait_result("board-1", "sum")
    assert result.state is TaskState.COMPLETED
    assert result.result == ["42"]
    assert (result.runs, result.error) == (1, None)
    assert result.started_at <= result.finished_at
    status = fleet.wait_task("board-1", "sum", lambda t: t.state is TaskState.COMPLETED)
    assert (status.result, status.runs, status.reason) == ("42", 1, None)
    assert fleet.state("board-1").observed_generation == generation

    request = next_request(5.0)
    assert request.proplet == "board-1"
    assert request.digest == add.digest
    assert request.chunk_size == library.sizes.chunk_size <= 4 * KiB
    assert request.chunks is None  # a module of 10 chunks comes in one answer
    assert fleet.server.chunks_sent == chunk_count(len(add.data), request.chunk_size) == 10
    assert board.dropped == 0


def test_the_host_api_is_log_now_ms_and_a_sleep_that_a_stop_ends(executor: Executor) -> None:
    wasm = bytes(wasmtime.wat2wasm(HOST_API_WAT))
    done: list[RunResult] = []

    nap = executor.start(wasm, Call("nap", (30,)), on_done=lambda _run, r: done.append(r))
    assert nap.join(5)
    assert nap.result is not None and nap.result.status == "completed"
    assert 30 <= int(nap.result.result or "0") < 200
    assert nap.result.output == "hello from the board\n"

    stray = executor.start(wasm, Call("stray"), on_done=lambda _run, r: done.append(r))
    assert stray.join(5)
    assert stray.result is not None and stray.result.status == "failed"
    assert stray.result.error == "log: bytes 65530..65630 lie outside linear memory (65536)"

    long_nap = executor.start(wasm, Call("nap", (60_000,)), on_done=lambda _run, r: done.append(r))
    wait_until(lambda: long_nap.logged, what="the guest's line, logged right before it sleeps")
    stopped_at = time.monotonic()
    long_nap.stop()
    assert long_nap.join(1)
    assert time.monotonic() - stopped_at < 0.1
    assert long_nap.result is not None and long_nap.result.status == "stopped"
    assert [r.status for r in done] == ["completed", "failed", "stopped"]


def test_a_spinning_task_stops_within_100_ms_and_the_board_keeps_serving(
    fleet: Fleet, boards: Boards
) -> None:
    spin, add = module("spin"), module("add")
    fleet.serve(spin, add)
    board = boards("board-1")
    fleet.desire("board-1", [task("spinner", spin, function="spin", daemon=True)])
    fleet.wait_task("board-1", "spinner", lambda t: t.state is TaskState.RUNNING)
    wait_until(lambda: board.running == 1, what="the run to start")

    stop_sent = time.monotonic()
    fleet.desire("board-1", [])
    wait_until(lambda: board.running == 0, timeout=2.0, what="the run to end")
    stopped_in = time.monotonic() - stop_sent
    assert stopped_in < 0.1, f"stopped {stopped_in * 1000:.1f} ms after the desired set"
    assert board.executor.running == 0
    fleet.wait(lambda o: o.states["board-1"].tasks == [], what="the task gone from the state")

    fleet.desire("board-1", [task("sum", add, function="add", args=["2", "40"])])
    result = fleet.wait_result("board-1", "sum")
    assert (result.state, result.result) == (TaskState.COMPLETED, ["42"])


def test_a_timeout_stops_a_spinning_run_and_fails_the_task(fleet: Fleet, boards: Boards) -> None:
    spin = module("spin")
    fleet.serve(spin)
    boards("board-1")

    fleet.desire("board-1", [task("spinner", spin, function="spin", timeout_ms=300)])

    result = fleet.wait_result("board-1", "spinner")
    assert result.state is TaskState.FAILED
    assert result.error == "timed out after 300 ms"
    assert 0.29 <= result.finished_at - result.started_at < 0.6
    status = fleet.wait_task("board-1", "spinner", lambda t: t.state is TaskState.FAILED)
    assert status.reason == "timed out after 300 ms"


def test_limits_and_modules_a_board_cannot_run_fail_with_a_reason(
    fleet: Fleet, boards: Boards
) -> None:
    grow, forever, add = module("grow"), module("forever"), module("add")
    fleet.serve(grow, forever, add)
    boards("board-1")

    fleet.desire("board-1", [
        task("greedy", grow, function="grow"),
        task("modest", grow, function="grow", memory=128 * KiB),
        task("wasi", forever, function="_start"),
        task("floaty", add, function="scale", args=["1", "2"]),
    ])  # fmt: skip

    trap = "then trap: unreachable executed"
    expected = {
        "greedy": f"memory limit of {DEFAULT_MEMORY} bytes reached; {trap}",
        "modest": f"memory limit of {128 * KiB} bytes reached; {trap}",
        "wasi": "module imports wasi_snapshot_preview1.",
        "floaty": "parameter 1 is f64; a board passes integers only",
    }
    for name, error in expected.items():
        result = fleet.wait_result("board-1", name)
        assert result.state is TaskState.FAILED, name
        assert result.error is not None and result.error.startswith(error), result.error
        status = fleet.wait_task("board-1", name, lambda t: t.state is TaskState.FAILED)
        assert status.reason is not None and status.reason.startswith(error[:60]), status.reason

    # What a board cannot honour at all: refused by the core, or by the board at the start.
    fleet.desire("board-1", [
        task("metered", add, function="add", args=["1", "2"], fuel=1000),
        task("wordy", add, function="add", args=["two", "2"]),
        task("command", forever),
    ])  # fmt: skip

    metered = fleet.wait_result("board-1", "metered")
    assert metered.error == "fuel limits are not supported on this board"
    reasons = {
        "metered": "fuel limits are not supported on this board",
        "wordy": "argument 1 is not an integer: a wamr board passes int64 arguments",
        "command": "no function given: a wamr board calls an exported function",
    }
    for name, reason in reasons.items():
        status = fleet.wait_task("board-1", name, lambda t: t.state is TaskState.FAILED)
        assert status.reason is not None and status.reason.startswith(reason), status.reason
    assert ("board-1", "wordy") not in fleet.observed.results  # refused, never run


def test_a_desired_set_larger_than_the_task_table_leaves_the_rest_not_placed(
    fleet: Fleet, boards: Boards, library: Library
) -> None:
    add = module("add")
    fleet.serve(add)
    boards("board-1")
    slots = library.sizes.max_tasks
    names = [f"t{n}" for n in range(1, slots + 3)]

    fleet.desire(
        "board-1", [task(name, add, function="add", args=[str(n), "1"]) for n, name in
                    enumerate(names, start=1)],
    )  # fmt: skip

    for n, name in enumerate(names[:slots], start=1):
        assert fleet.wait_result("board-1", name).result == [str(n + 1)]

    def all_reported(o: Observed) -> ReportedState | None:
        state = o.states["board-1"]
        return state if len(state.tasks) == len(names) else None

    state = fleet.wait(all_reported, what="every task reported")
    assert state is not None
    by_name = {t.name: t for t in state.tasks}
    for name in names[slots:]:
        assert by_name[name].state is TaskState.PENDING
        assert by_name[name].reason == f"not placed: the task table holds {slots} tasks"
        assert ("board-1", name) not in fleet.observed.results


def test_a_one_shot_task_runs_once_per_spec_across_a_board_restart(
    fleet: Fleet, boards: Boards, tmp_path: Path
) -> None:
    add = module("add")
    fleet.serve(add)
    state_dir = tmp_path / "boards"
    first = boards("board-1", state_dir=state_dir)
    fleet.desire("board-1", [task("sum", add, function="add", args=["2", "40"])])
    result = fleet.wait_result("board-1", "sum")
    first.stop()
    fleet.wait(lambda o: o.presence.get("board-1") is False, what="board-1 offline")
    assert (state_dir / "board-1.json").is_file()

    restarted_at = time.time() - 0.002  # the board reports milliseconds

    second = boards("board-1", state_dir=state_dir)

    def applied_after_restart(o: Observed) -> ReportedState | None:
        state = o.states["board-1"]
        return state if state.ts >= restarted_at and state.observed_generation == 1 else None

    state = fleet.wait(applied_after_restart, what="the restarted board's applied state")
    assert state is not None
    # Restored from the board's kv, not run again: a run would show Running and runs == 2.
    assert [(t.name, t.state, t.runs, t.result) for t in state.tasks] == [
        ("sum", TaskState.COMPLETED, 1, "42")
    ]
    assert second.running == 0
    assert fleet.observed.results[("board-1", "sum")] == result


# -- faults -----------------------------------------------------------------------------------


def test_malformed_messages_are_dropped_and_the_board_keeps_working(
    fleet: Fleet, boards: Boards
) -> None:
    add = module("add")
    fleet.serve(add)
    board = boards("board-1")
    fleet.desire("board-1", [task("first", add, function="add", args=["1", "1"])])
    assert fleet.wait_result("board-1", "first").result == ["2"]
    received, dropped = board.received, board.dropped
    good = task("second", add, function="add", args=["2", "40"]).model_dump(exclude_none=True)
    wrong_type = json.dumps({"generation": 5, "tasks": [{**good, "size": "167"}]}).encode()
    garbage: list[tuple[str, bytes]] = [
        (NS.desired("board-1"), b"\xff\xfe\x00garbage"),
        (NS.desired("board-1"), b'{"generation":5,"tasks":['),
        (NS.desired("board-1"), b"[]"),
        (NS.desired("board-1"), b'{"generation":"5","tasks":[]}'),
        (NS.desired("board-1"), b'{"generation":5,"tasks":{}}'),
        (NS.desired("board-1"), b'{"generation":5,"tasks":[{"name":"NOT A LABEL"}]}'),
        (NS.desired("board-1"), wrong_type),
        (NS.desired("board-1"), b"[" * 5000 + b"]" * 5000),
        (NS.desired("board-1"), b'{"generation":5,"tasks":[' + b" " * (300 * KiB) + b"]}"),
        (NS.artifact_offer("board-1", "0" * 64), b'{"digest":7}'),
        (NS.artifact_chunk("board-1", "0" * 64, 0), b"\0asm"),
    ]
    for topic, payload in garbage:
        fleet.client.publish(topic, payload)

    wait_until(lambda: board.received >= received + len(garbage), what="the garbage delivered")
    assert board.dropped == dropped + len(garbage)
    assert board.observed_generation == 1
    fleet.desire("board-1", [task("second", add, function="add", args=["2", "40"])])
    assert fleet.wait_result("board-1", "second").result == ["42"]
    assert board.observed_generation == 2
    assert board.dropped == dropped + len(garbage)


def test_a_transfer_cut_by_a_broker_restart_resumes_with_the_missing_chunks(
    executor: Executor, library: Library, tmp_path: Path
) -> None:
    """The test plays the artifact server: it answers the first request with only part of the
    chunks, then the broker restarts. Mosquitto keeps sessions and retained messages on disk,
    and the test's client has a persistent session, so nothing the board publishes is lost.
    """
    mosquitto = Mosquitto(tmp_path / "mosquitto", persistence=True)
    mosquitto.start()
    server: ProbeClient | None = None
    boards = Boards(mosquitto, executor, library, None)
    try:
        server = connect_client(
            mosquitto, "resume-server", protocol=mqtt.MQTTv311, clean_start=False
        )
        server.subscribe_wait(NS.artifact_request())
        server.subscribe_wait(NS.result("board-1", "sum"))
        next_request = requests_on(server)
        board = boards("board-1")
        chunk_size = library.sizes.chunk_size
        big = padded(module("add"), 40 * chunk_size - 100)  # 40 chunks; larger than one window
        count = chunk_count(len(big.data), chunk_size)
        hex_digest = big.digest.removeprefix("sha256:")

        def send(indices: range) -> None:
            offer = ArtifactOffer(
                digest=big.digest, size=len(big.data), chunk_size=chunk_size, chunks=count
            )
            server.publish_wait(NS.artifact_offer("board-1", hex_digest), offer.encode())
            for i in indices:
                chunk = big.data[i * chunk_size : (i + 1) * chunk_size]
                server.publish_wait(NS.artifact_chunk("board-1", hex_digest, i), chunk)

        desired = DesiredSet(
            generation=1, tasks=[task("sum", big, function="add", args=["2", "40"])]
        )
        server.publish_wait(NS.desired("board-1"), desired.encode(), retain=True)
        first = next_request(5.0)
        assert first.digest == big.digest and first.chunk_size == chunk_size
        window = first.chunks or []
        assert window == list(range(len(window))) and 0 < len(window) < count
        before = board.received
        send(range(16))
        wait_until(lambda: board.received >= before + 17, what="the offer and 16 chunks in")

        mosquitto.restart()

        resumed = next_request(10.0)
        assert resumed.digest == big.digest and resumed.chunk_size == chunk_size
        assert resumed.chunks == list(range(16, count))  # what is missing, nothing more
        send(range(16, count))
        message = server.wait_for_topic(NS.result("board-1", "sum"), timeout=5.0)
        result = decode(TaskResult, bytes(message.payload))
        assert (result.state, result.result) == (TaskState.COMPLETED, ["42"])
        assert board.connects == 2
    finally:
        boards.close()
        if server is not None:
            server.close()
        mosquitto.stop()
