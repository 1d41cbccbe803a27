"""``propctl quickstart`` end to end, and the embedded broker it runs on.

The quickstart runs as a user runs it, ``python -m propctl quickstart``, in a subprocess whose
temporary and cache directories are the test's. Each test then checks what the quickstart printed
and that nothing it started is left: no proplet process, no listening socket, no files.
The broker tests drive the embedded amqtt broker with paho MQTT 3.1.1 clients, the way proplets
and propctl use it.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import paho.mqtt.client as mqtt
import pytest

from tests.broker import ProbeClient, pid_exists

pytest.importorskip("amqtt")

from propctl.embedded_broker import EmbeddedBroker

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90.0

# (task, proplet) -> (state, result column) of the examples/quickstart fleet.
EXPECTED_TASKS = {
    ("primes", "edge-b1"): ("Completed", "78498"),
    ("fib", "edge-a1"): ("Completed", "2880067194370816120"),
    ("wordcount", "edge-a1"): ("Completed", "Hello, edge fleet! 3 lines, 14 words, 86 bytes"),
    ("wordcount", "edge-a2"): ("Completed", "Hello, edge fleet! 3 lines, 14 words, 86 bytes"),
    ("heartbeat", "edge-a1"): ("Running", "-"),
    ("heartbeat", "edge-a2"): ("Running", "-"),
    ("heartbeat", "edge-b1"): ("Running", "-"),
}


# The quickstart as a subprocess -----------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """What the quickstart said it started, from its progress on stderr."""

    port: int
    pids: tuple[int, ...]

    @classmethod
    def parse(cls, stderr: str) -> Started:
        port = re.search(r"embedded MQTT broker on 127\.0\.0\.1:(\d+)", stderr)
        pids = tuple(int(p) for p in re.findall(r"\bpid (\d+)\b", stderr))
        assert port is not None, stderr
        assert len(pids) == 3, stderr
        return cls(int(port.group(1)), pids)


def _env(tmp_path: Path) -> dict[str, str]:
    """The test's own temporary and cache directories, so that leftovers can be seen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_")}
    for name in ("tmp", "xdg-cache"):
        (tmp_path / name).mkdir(exist_ok=True)
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        TMPDIR=str(tmp_path / "tmp"),
        XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
    )
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "propctl", "quickstart", *args]


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def assert_nothing_left(started: Started, tmp_path: Path) -> None:
    alive = [pid for pid in started.pids if pid_exists(pid)]
    assert alive == [], f"proplet processes left behind: {alive}"
    assert _port_closed(started.port), f"the broker still listens on port {started.port}"
    assert list((tmp_path / "tmp").iterdir()) == [], "the quickstart left files in TMPDIR"
    assert list((tmp_path / "xdg-cache").iterdir()) == [], "the quickstart wrote to ~/.cache"


def _kill_leftovers(stderr: str) -> None:
    """After a failed test, stop what the quickstart did not, so the next tests start clean."""
    for pid in (int(p) for p in re.findall(r"\bpid (\d+)\b", stderr)):
        if pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def task_table(stdout: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The quickstart's task table: (task, proplet) -> (state, result), cut at header offsets."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NAME "))
    header = lines[start]
    names = header.split()
    offsets = [header.index(name) for name in names] + [None]
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = dict(
            zip(names, (line[a:b].strip() for a, b in itertools.pairwise(offsets)), strict=True)
        )
        rows[(cells["NAME"], cells["PROPLET"])] = (cells["STATE"], cells["RESULT"])
    return rows


class LineReader:
    """Lines of a child's stream, read on a thread so a test can wait for one with a timeout."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; got:\n{self.text()}") from None
            self.seen.append(line)
            if text in line:
                return line

    def text(self) -> str:
        self._thread.join(0.1)
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)


def _run_quickstart(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run to the end: exit code, stdout, stderr. On a timeout, kill it and what it started."""
    process = subprocess.Popen(
        _command(*args), env=_env(tmp_path), cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        _kill_leftovers(stderr)
        raise AssertionError(f"no end in {TIMEOUT}s\n{stdout}{stderr}") from None
    return process.returncode, stdout, stderr


def test_quickstart_converges_prints_results_and_stops_everything(tmp_path: Path) -> None:
    began = time.monotonic()
    code, stdout, stderr = _run_quickstart(tmp_path)
    elapsed = time.monotonic() - began
    output = f"--- stdout\n{stdout}--- stderr\n{stderr}"
    try:
        assert code == 0, output
        assert task_table(stdout) == EXPECTED_TASKS, output
        for line in (
            "== primes on edge-b1: Completed, returned 78498",
            "== fib on edge-a1: Completed, returned 2880067194370816120",
            "== wordcount on edge-a1: Completed, exit code 0",
            "== wordcount on edge-a2: Completed, exit code 0",
            "   | Hello, edge fleet!",
            "   | 3 lines, 14 words, 86 bytes",
            "== heartbeat on edge-b1: Running (a daemon: it runs until stopped)",
        ):
            assert line in stdout.splitlines(), output
        assert "propctl quickstart --keep-running" in stdout
        for progress in ("starting 3 proplets", "applying revision", "converged after",
                         "stopped everything it started"):  # fmt: skip
            assert progress in stderr, output
        assert_nothing_left(Started.parse(stderr), tmp_path)
    finally:
        _kill_leftovers(stderr)
    assert elapsed < 30, f"the quickstart took {elapsed:.1f}s; its goal is a few seconds"


def test_keep_running_serves_the_fleet_until_ctrl_c(tmp_path: Path) -> None:
    env = _env(tmp_path)
    process = subprocess.Popen(
        _command("--keep-running"), env=env, cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = LineReader(process.stdout), LineReader(process.stderr)
    try:
        stderr.wait_for("press Ctrl-C")
        export = stdout.wait_for("export PROPELLER_BROKER=")
        started = Started.parse(stderr.text())
        assert f"PROPELLER_BROKER=mqtt://127.0.0.1:{started.port}" in export

        # The fleet is really up: another propctl sees every task through the broker.
        tasks = subprocess.run(
            [sys.executable, "-m", "propctl", "get", "tasks", "-o", "json",
             "--broker", f"mqtt://127.0.0.1:{started.port}"],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert tasks.returncode == 0, tasks.stderr
        seen = {(r["name"], r["proplet"]): r["state"] for r in json.loads(tasks.stdout)}
        assert seen == {key: state for key, (state, _result) in EXPECTED_TASKS.items()}

        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, stderr.text()
        assert "stopped everything it started" in stderr.text()
        assert_nothing_left(started, tmp_path)
    finally:
        process.kill()
        process.wait(10)
        _kill_leftovers(stderr.text())


def test_ctrl_c_while_starting_stops_what_was_started(tmp_path: Path) -> None:
    process = subprocess.Popen(
        _command(), env=_env(tmp_path), cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stderr = LineReader(process.stderr)
    try:
        stderr.wait_for("starting 3 proplets")
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130, stderr.text()
        assert "interrupted: stopped everything" in stderr.text()
        assert_nothing_left(Started.parse(stderr.text()), tmp_path)
    finally:
        process.kill()
        process.wait(10)
        _kill_leftovers(stderr.text())


def test_without_amqtt_it_says_how_to_install_it(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "amqtt"  # an amqtt without its broker: as if not installed
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shadow"), str(REPO_ROOT)])
    done = subprocess.run(
        _command(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "error: the quickstart runs an embedded MQTT broker, amqtt" in done.stderr
    assert "hint: pip install 'propeller[quickstart]'" in done.stderr
    assert "started" not in done.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


# The embedded broker ----------------------------------------------------------------------------


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
    assert _port_closed(broker.port)


Connect = Callable[..., ProbeClient]  # connect(will=(topic, payload) | None)


@pytest.fixture
def client(embedded: EmbeddedBroker) -> Iterator[Connect]:
    made: list[ProbeClient] = []

    def connect(will: tuple[str, bytes] | None = None) -> ProbeClient:
        probe = ProbeClient(f"t-{uuid.uuid4().hex[:10]}", protocol=mqtt.MQTTv311,
                            clean_session=True)  # fmt: skip
        if will is not None:
            probe.will_set(will[0], will[1], qos=1, retain=True)
        probe.connect(embedded.host, embedded.port, keepalive=30)
        probe.loop_start()
        assert not probe.wait_connack().is_failure
        made.append(probe)
        return probe

    yield connect
    for probe in made:
        probe.close()


def _received(probe: ProbeClient, marker: str) -> list[tuple[str, bytes, bool]]:
    """Everything ``probe`` got before its own ``marker`` came back (publish it first)."""
    got = []
    while True:
        msg = probe.next_message()
        if msg.topic == marker:
            return got
        got.append((msg.topic, bytes(msg.payload), bool(msg.retain)))


def _mark(probe: ProbeClient) -> str:
    marker = f"observers/{uuid.uuid4().hex[:10]}"
    probe.subscribe_wait(marker, qos=0)
    probe.publish_wait(marker, b"end", qos=0)
    return marker


def _settle(publisher: ProbeClient) -> None:
    """Until the broker has handled everything ``publisher`` sent (a PUBACK comes earlier)."""
    _received(publisher, _mark(publisher))


def test_embedded_broker_listens_on_127_0_0_1_only(embedded: EmbeddedBroker) -> None:
    assert embedded.url == f"mqtt://127.0.0.1:{embedded.port}"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", embedded.port)) == 0
    # Another loopback address reaches a socket bound to any address, but not this one.
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.2", embedded.port)) != 0


def test_retained_reach_late_wildcard_subscribers_and_empty_payload_clears(client: Connect) -> None:
    publisher = client()
    publisher.publish_wait("m/d/c/c/proplets/p1/state", b"s1", qos=1, retain=True)
    publisher.publish_wait("m/d/c/c/proplets/p2/state", b"s2", qos=1, retain=True)
    publisher.publish_wait("m/d/c/c/proplets/p2/heartbeat", b"h", qos=0)  # not retained
    _settle(publisher)

    for topic_filter in ("m/d/c/c/proplets/+/state", "m/d/c/c/proplets/+/+", "m/d/c/#"):
        late = client()
        late.subscribe_wait(topic_filter, qos=0)
        got = _received(late, _mark(late))
        assert sorted(got) == [
            ("m/d/c/c/proplets/p1/state", b"s1", True),
            ("m/d/c/c/proplets/p2/state", b"s2", True),
        ], topic_filter

    live = client()
    live.subscribe_wait("m/d/c/c/proplets/+/state", qos=1)
    _received(live, _mark(live))
    publisher.publish_wait("m/d/c/c/proplets/p1/state", b"", qos=1, retain=True)
    _settle(publisher)
    assert live.wait_for_topic("m/d/c/c/proplets/p1/state").payload == b""  # live ones see it

    after = client()
    after.subscribe_wait("m/d/c/#", qos=1)
    assert _received(after, _mark(after)) == [("m/d/c/c/proplets/p2/state", b"s2", True)]


def test_qos_0_and_1_are_delivered_in_order(client: Connect) -> None:
    subscriber = client()
    subscriber.subscribe_wait("m/d/c/c/tasks/#", qos=1)
    publisher = client()
    for i in range(20):
        publisher.publish_wait(f"m/d/c/c/tasks/{i}", str(i).encode(), qos=i % 2)
    got = [subscriber.next_message() for _ in range(20)]
    assert [int(m.payload) for m in got] == list(range(20))
    assert all(not m.retain for m in got)


def test_last_will_fires_when_a_client_vanishes_not_when_it_leaves(client: Connect) -> None:
    watcher = client()
    watcher.subscribe_wait("m/d/c/c/proplets/+/presence", qos=1)
    leaving = client(will=("m/d/c/c/proplets/p8/presence", b"left"))
    leaving.close()  # DISCONNECT first: no will
    vanishing = client(will=("m/d/c/c/proplets/p9/presence", b'{"online":false}'))
    vanishing.loop_stop()
    vanishing.socket().close()  # no DISCONNECT: the broker publishes the will

    will = watcher.next_message()
    assert (will.topic, will.payload) == ("m/d/c/c/proplets/p9/presence", b'{"online":false}')
    late = client()
    late.subscribe_wait("m/d/c/c/proplets/+/presence", qos=0)
    assert _received(late, _mark(late)) == [
        ("m/d/c/c/proplets/p9/presence", b'{"online":false}', True)
    ]


def test_retained_go_only_with_a_clients_own_subscriptions(client: Connect) -> None:
    # amqtt 0.12.1 sends a connecting client the retained messages of every filter that any
    # client subscribed to; the embedded broker does not.
    observer = client()
    observer.subscribe_wait("m/d/c/c/proplets/+/+", qos=0)
    publisher = client()
    publisher.publish_wait("m/d/c/c/proplets/p1/state", b"s1", qos=1, retain=True)
    _settle(publisher)
    newcomer = client()
    assert _received(newcomer, _mark(newcomer)) == []


def test_snapshot_marker_arrives_after_every_retained_message(client: Connect) -> None:
    # An observer subscribes to several filters and at once publishes a marker to itself; every
    # retained message must arrive before the marker. amqtt 0.12.1 alone breaks this almost
    # every time with six filters.
    filters, per_filter = 6, 10
    publisher = client()
    for f in range(filters):
        for i in range(per_filter):
            publisher.publish(f"m/d/c/c/f{f}/t{i}", b"x", qos=1, retain=True)
    _settle(publisher)
    for _trial in range(10):
        observer = client()
        marker = f"observers/{uuid.uuid4().hex[:10]}"
        observer.subscribe(marker, 0)
        for f in range(filters):
            observer.subscribe(f"m/d/c/c/f{f}/+", 0)
        observer.publish(marker, b"end", qos=0)
        assert len(_received(observer, marker)) == filters * per_filter
        observer.close()
