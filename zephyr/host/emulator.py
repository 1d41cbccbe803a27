"""Boards without hardware: the board core (the C library) on a real MQTT connection.

A ``Board`` is what the firmware is on a microcontroller, with the host standing in for the
hardware: one core in its own arena, one MQTT session (paho) that streams each message into the
core in small slices as the firmware does off its socket, Wasm runs on wasmtime under a board's
limits (``zephyr.host.wasm``), key-value state in memory or in a small JSON file, and a tick.
The core decides everything (what to fetch, run, stop and report); the board only carries out
its callbacks.

Threads: paho's network thread (one per board) feeds messages and session events, a ticker
thread (one per process) drives time, and worker threads (one per run) report how runs ended.
A per-board lock serialises every call into the core, as the firmware's single work queue does.

Run one board, or many in one process (for scale)::

    python -m zephyr.host.emulator --broker mqtt://127.0.0.1:1883 --id board-1
    python -m zephyr.host.emulator --boards 200 --id-prefix board-
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from proplet.session import paho_client
from schemas.connection import (
    DEFAULT_BROKER,
    ENV_BROKER,
    ENV_CA_FILE,
    ENV_CHANNEL,
    ENV_DOMAIN,
    ENV_PASSWORD,
    ENV_USERNAME,
    BrokerSettings,
    ConnectionSettingsError,
    broker_settings,
)
from schemas.quantities import parse_memory
from zephyr.host.library import (
    LOG_LEVELS,
    RUN_OK,
    RUN_STOPPED,
    RUN_TRAP,
    Core,
    CoreError,
    Library,
    LibraryNotFound,
    load,
)
from zephyr.host.wasm import DEFAULT_MEMORY, Call, Executor, Run, RunResult

log = logging.getLogger(__name__)

SLICE_BYTES = 512  # what the firmware reads off its socket at a time
TICK_SECONDS = 0.05
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
OFFLINE_CONFIRM_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class BoardConfig:
    proplet_id: str
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 5.0
    memory: int = DEFAULT_MEMORY  # linear memory one run may use, whatever the task asks
    slice_bytes: int = SLICE_BYTES
    state_dir: Path | None = None  # kv state in {state_dir}/{id}.json; None keeps it in memory
    version: str | None = None  # None: the core's own


class Ticker:
    """One thread driving the clock of every board of the process."""

    def __init__(self, interval: float = TICK_SECONDS) -> None:
        self.interval = interval
        self._boards: list[Board] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, board: Board) -> None:
        with self._lock:
            self._boards.append(board)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="board-ticker", daemon=True)
                self._thread.start()

    def remove(self, board: Board) -> None:
        with self._lock:
            if board in self._boards:
                self._boards.remove(board)

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            with self._lock:
                boards = list(self._boards)
            for board in boards:
                try:
                    board.tick()
                except Exception:
                    log.exception("%s: tick failed", board.id)


class KeyValue:
    """A board's persistent settings: a dict, saved as JSON (values in hex) when given a path."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.values: dict[str, bytes] = {}
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
                self.values = {str(k): bytes.fromhex(str(v)) for k, v in stored.items()}
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("ignoring unreadable board state %s: %s", path, exc)

    def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    def set(self, key: str, value: bytes) -> bool:
        if value:
            self.values[key] = value
        else:
            self.values.pop(key, None)
        if self.path is None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps({k: v.hex() for k, v in sorted(self.values.items())}))
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("cannot save board state %s: %s", self.path, exc)
            return False
        return True


class Board:
    """One emulated board: a core, its MQTT session, its runs. Implements the core's Platform."""

    def __init__(
        self,
        config: BoardConfig,
        settings: BrokerSettings,
        *,
        executor: Executor,
        library: Library | None = None,
        ticker: Ticker | None = None,
    ) -> None:
        self.config = config
        self.id = config.proplet_id
        self.settings = settings
        self.executor = executor
        self.library = library or load()
        self._own_ticker = ticker is None
        self.ticker = ticker or Ticker()
        self.kv = KeyValue(
            config.state_dir / f"{self.id}.json" if config.state_dir is not None else None
        )
        self._lock = threading.RLock()  # re-entrant: a start may report its failure at once
        self._runs: dict[int, Run] = {}
        self._closing = False
        self._stopped = False
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._started = time.monotonic()
        self.connects = 0
        self.received = 0  # messages fed to the core
        self.dropped = 0  # of which the core refused
        ns = settings.namespace
        self.core = Core(
            self.library,
            self,
            proplet_id=self.id,
            domain=ns.domain,
            channel=ns.channel,
            labels=config.labels,
            heartbeat_ms=max(1, round(config.heartbeat_s * 1000)),
            version=config.version,
        )
        self.will_topic, self.will_payload = self.core.will()
        client = paho_client(
            settings,
            # Unique per namespace: the same id in two channels must not take each other's session.
            f"board-{ns.domain}-{ns.channel}-{self.id}",
            (self.will_topic, self.will_payload),
            max_inflight=32,
        )
        # Reconnect backoff doubles up to BACKOFF_MAX from a first delay drawn per board, so a
        # fleet that lost its broker does not come back in one burst.
        first_delay = random.uniform(BACKOFF_INITIAL / 2, BACKOFF_INITIAL)
        client.reconnect_delay_set(first_delay, BACKOFF_MAX)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # -- lifecycle

    def start(self) -> None:
        # paho's own thread connects, reconnects and is the only one writing to the socket:
        # publishes from the tick and run threads are queued for it (paho's writes are not
        # safe from two threads at once).
        keepalive = max(2, int(self.config.heartbeat_s * 3))
        self._client.connect_async(self.settings.host, self.settings.port, keepalive)
        self._client.loop_start()
        self.ticker.add(self)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the runs, say offline (a clean disconnect sends no will) and disconnect."""
        self.ticker.remove(self)
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._closing = True
            runs = list(self._runs.values())
        for run in runs:
            run.stop()
        if self._connected.is_set():
            info = self._client.publish(self.will_topic, self.will_payload, qos=1, retain=True)
            try:
                info.wait_for_publish(OFFLINE_CONFIRM_SECONDS)
            except (RuntimeError, ValueError) as exc:
                log.warning("%s: offline presence not confirmed: %s", self.id, exc)
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()
        for run in runs:
            run.join(max(0.1, timeout / 10))
        if self._own_ticker:
            self.ticker.close()

    def sever(self) -> None:
        """Cut the TCP connection without a DISCONNECT, as a lost radio link does.

        The broker then publishes the board's will; the board reconnects with backoff.
        """
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)

    def tick(self) -> None:
        with self._lock:
            if not self._closing:
                self.core.tick(self.now_ms())

    @property
    def running(self) -> int:
        with self._lock:
            return self.core.running

    @property
    def observed_generation(self) -> int:
        with self._lock:
            return self.core.observed_generation

    # -- paho's network thread

    def _lost(self) -> None:
        if self._connected.is_set():
            self._connected.clear()
            with self._lock:
                self.core.disconnect()

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            log.error(
                "%s: broker %s refused the connection: %s", self.id, self.settings.url, reason
            )
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Small packets go out at once instead of waiting on a delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        self._connected.set()
        log.info("%s: connected to %s", self.id, self.settings.url)
        with self._lock:
            # The core subscribes and publishes presence, announce and state from in here.
            self.core.connect()

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        log.warning("%s: broker %s unreachable; retrying with backoff", self.id, self.settings.url)

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if not self._stopping.is_set():
            log.warning("%s: disconnected from %s: %s", self.id, self.settings.url, reason)
        self._lost()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        with self._lock:
            if self._closing:
                return
            self.received += 1
            taken = self.core.message(msg.topic, payload, self.config.slice_bytes)
            if not taken:
                self.dropped += 1
                log.debug(
                    "%s: dropped a message on %s: %s", self.id, msg.topic, self.core.last_error
                )

    # -- the Platform: called by the core, with the board lock held

    def now_ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("%s: publish to %s failed: %s", self.id, topic, mqtt.error_string(info.rc))
            return False
        return True

    def subscribe(self, topic_filter: str, qos: int) -> bool:
        result, _mid = self._client.subscribe(topic_filter, qos)
        return bool(result == MQTTErrorCode.MQTT_ERR_SUCCESS)

    def wasm_start(
        self,
        slot: int,
        module: bytes,
        function: str,
        args: tuple[int, ...],
        memory: int,
        timeout_ms: int,
        fuel: int,
    ) -> int:
        if self._closing:
            return -1
        if fuel > 0:
            # The board's runtime cannot count instructions: say so on the task.
            self.core.task_finished(
                slot, RUN_TRAP, error="fuel limits are not supported on this board"
            )
            return 0
        call = Call(function, args, memory=memory or None, timeout_ms=timeout_ms or None)
        run = self.executor.start(
            module,
            call,
            board_memory=self.config.memory,
            on_done=lambda run, result: self._finished(slot, run, result),
            name=f"{self.id}-{slot}",
        )
        self._runs[slot] = run
        return 0

    def wasm_stop(self, slot: int) -> None:
        run = self._runs.get(slot)
        if run is not None:
            run.stop()

    def kv_get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    def kv_set(self, key: str, value: bytes) -> bool:
        return self.kv.set(key, value)

    def log(self, level: int, message: str) -> None:
        log.log(LOG_LEVELS.get(level, logging.INFO), "%s: %s", self.id, message)

    # -- worker threads

    def _finished(self, slot: int, run: Run, result: RunResult) -> None:
        with self._lock:
            if self._runs.get(slot) is run:
                del self._runs[slot]
            if self._closing:
                return  # as after a power cut: the core sees the run again after a restart
            if result.status == "completed":
                value = int(result.result) if result.result is not None else None
                self.core.task_finished(slot, RUN_OK, result=value)
            elif result.status == "stopped":
                self.core.task_finished(slot, RUN_STOPPED, error=result.error)
            else:
                self.core.task_finished(slot, RUN_TRAP, error=result.error)


# --- the command line ------------------------------------------------------------------------


def board_ids(single: str | None, count: int, prefix: str) -> list[str]:
    if single is not None:
        return [single]
    return [f"{prefix}{n}" for n in range(1, count + 1)]


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for text in pairs:
        for pair in text.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--labels {pair!r}: use KEY=VALUE, e.g. zone=a")
            labels[key.strip()] = value.strip()
    return labels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zephyr.host.emulator",
        description="Run emulated boards (the board core on the host) against an MQTT broker.",
    )
    parser.add_argument(
        "--broker", default=os.environ.get(ENV_BROKER, DEFAULT_BROKER),
        help=f"mqtt://host:port or mqtts://host:port [env {ENV_BROKER}]",
    )  # fmt: skip
    for flag, env, default in (
        ("--domain", ENV_DOMAIN, "default"),
        ("--channel", ENV_CHANNEL, "default"),
        ("--username", ENV_USERNAME, None),
        ("--password", ENV_PASSWORD, None),
        ("--ca-file", ENV_CA_FILE, None),
    ):
        parser.add_argument(flag, default=os.environ.get(env, default), help=f"[env {env}]")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--id", help="the board's proplet id (one board)")
    who.add_argument("--boards", type=int, default=1, help="run N boards: PREFIX1..PREFIXN")
    parser.add_argument("--id-prefix", default="board-", help="id prefix with --boards")
    parser.add_argument(
        "--labels", action="append", default=[], metavar="K=V[,K=V]", help="board labels"
    )
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument(
        "--memory", default=str(DEFAULT_MEMORY),
        help="linear memory one run may use (bytes or 256Ki, 1Mi)",
    )  # fmt: skip
    parser.add_argument(
        "--slice", type=int, default=SLICE_BYTES, help="bytes fed to the core at a time"
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="keep each board's kv here")
    parser.add_argument("--library", type=Path, default=None, help="libpropeller_board.so path")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: the boards' own log; -vv: debug"
    )
    options = parser.parse_args(argv)
    if options.id is None and options.boards < 1:
        parser.error("--boards must be at least 1")
    if options.slice < 1:
        parser.error("--slice must be at least 1")
    if options.heartbeat <= 0:
        parser.error("--heartbeat must be positive")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if options.verbose == 0:
        # The boards' own lines (connects, applied sets) only with -v; warnings always.
        log.setLevel(logging.WARNING)
    try:
        settings = broker_settings(
            options.broker, domain=options.domain, channel=options.channel,
            username=options.username, password=options.password, ca_file=options.ca_file,
        )  # fmt: skip
        labels = parse_labels(options.labels)
        memory = parse_memory(options.memory)
        library = load(options.library)
    except (ConnectionSettingsError, ValueError, LibraryNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    executor = Executor()
    ticker = Ticker()
    boards: list[Board] = []
    try:
        for proplet_id in board_ids(options.id, options.boards, options.id_prefix):
            config = BoardConfig(
                proplet_id, labels=labels, heartbeat_s=options.heartbeat, memory=memory,
                slice_bytes=options.slice, state_dir=options.state_dir,
            )  # fmt: skip
            board = Board(config, settings, executor=executor, library=library, ticker=ticker)
            boards.append(board)
            board.start()
    except (CoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        for board in boards:
            board.stop()
        return 2
    sizes = library.sizes
    log.warning(
        "%d board(s) on %s (library %s: %d task slots, modules up to %d bytes, %d-byte chunks)",
        len(boards), settings.url, library.path, sizes.max_tasks, sizes.module_max,
        sizes.chunk_size,
    )  # fmt: skip
    while not stopping.wait(0.5):
        pass
    log.warning("stopping %d board(s)", len(boards))
    stoppers = [threading.Thread(target=board.stop) for board in boards]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join(10)
    ticker.close()
    executor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
