"""A small fleet for integration tests and benchmarks: real proplet processes on a real broker.

``Fleet`` publishes desired sets, serves test modules through the reconciler's artifact server,
and watches what the proplets report, with waits that fail with what was last seen.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from reconciler.artifacts import ArtifactServer
from reconciler.broker import Broker
from schemas.connection import BrokerSettings, broker_settings
from schemas.messages import (
    DecodeError,
    DesiredSet,
    DesiredTask,
    Heartbeat,
    Presence,
    ReportedState,
    TaskResult,
    TaskStatus,
    decode,
)
from schemas.topics import Kind, TopicError
from tests.broker import Mosquitto

WASM_DIR = Path(__file__).parent / "wasm"
REPO_ROOT = Path(__file__).parent.parent
T = TypeVar("T")


@dataclass(frozen=True)
class Module:
    name: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def module(name: str) -> Module:
    return Module(name, (WASM_DIR / f"{name}.wasm").read_bytes())


EMPTY_MODULE = b"\0asm\x01\0\0\0"  # the smallest valid core module: its header


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pad_module(data: bytes, size: int, seed: int = 7) -> bytes:
    """The module ``data`` grown to exactly ``size`` bytes by a custom section at its end.

    The section holds seeded random bytes, so the code is unchanged and the content (and
    digest) depends on ``seed``.
    """
    name = b"padding"
    for width in range(1, 6):
        body = size - len(data) - 1 - width  # section id, section size
        if len(leb128(body)) == width:
            filler = random.Random(seed).randbytes(body - len(leb128(len(name))) - len(name))
            return data + b"\0" + leb128(body) + leb128(len(name)) + name + filler
    raise ValueError(f"cannot pad a module of {len(data)} bytes to {size} bytes")


def task(name: str, mod: Module, *, spec_hash: str | None = None, **fields: Any) -> DesiredTask:
    """A desired task running ``mod``; its spec hash derives from the fields unless given."""
    body = {"digest": mod.digest, "size": len(mod.data), **fields}
    digest = hashlib.sha256(repr(sorted(body.items())).encode()).hexdigest()[:16]
    return DesiredTask(name=name, spec_hash=spec_hash or digest, owner="propctl", **body)


@dataclass
class Proplet:
    id: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@dataclass
class Observed:
    states: dict[str, ReportedState] = field(default_factory=dict)
    results: dict[tuple[str, str], TaskResult | None] = field(default_factory=dict)
    presence: dict[str, bool] = field(default_factory=dict)
    heartbeats: dict[str, list[Heartbeat]] = field(default_factory=dict)
    announces: dict[str, int] = field(default_factory=dict)


class Fleet:
    """Proplets on one broker, plus a client that plays the reconciler's part."""

    def __init__(self, broker: Mosquitto, tmp: Path, **settings: Any) -> None:
        self.mosquitto = broker
        self.tmp = tmp
        self.settings: BrokerSettings = broker_settings(broker.url, **settings)
        self.ns = self.settings.namespace
        self.modules: dict[str, bytes] = {}
        self.observed = Observed()
        self._cond = threading.Condition()
        self.proplets: list[Proplet] = []
        self.client = Broker(self.settings)
        self.client.connect()
        self.client.subscribe(f"{self.ns.root}/proplets/#", self._on_message, qos=0)
        self.server = ArtifactServer(self.client, self.ns, self.modules.get)
        self.server.start()
        self.generations: dict[str, int] = {}

    def serve(self, *mods: Module) -> None:
        for mod in mods:
            self.modules[mod.digest] = mod.data

    def start_proplet(
        self,
        proplet_id: str,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        verbose: bool = True,
    ) -> Proplet:
        data_dir = self.tmp / proplet_id
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.tmp / f"{proplet_id}.log"
        command = [
            sys.executable, "-m", "proplet", "--id", proplet_id, "--data-dir", str(data_dir),
            "--broker", self.settings.url, "--domain", self.ns.domain,
            "--channel", self.ns.channel, "--heartbeat", "0.5s", *args,
        ]  # fmt: skip
        if verbose:
            command.append("-v")
        environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=self.tmp
            )
        proplet = Proplet(proplet_id, process, data_dir, log_path)
        self.proplets.append(proplet)
        if wait:
            self.wait(lambda o: o.presence.get(proplet_id) is True and proplet_id in o.states,
                      timeout=15, what=f"{proplet_id} online", proplet=proplet)  # fmt: skip
        return proplet

    def desire(
        self, proplet_id: str, tasks: list[DesiredTask], generation: int | None = None
    ) -> int:
        gen = generation if generation is not None else self.generations.get(proplet_id, 0) + 1
        self.generations[proplet_id] = max(gen, self.generations.get(proplet_id, 0))
        desired = DesiredSet(generation=gen, tasks=tasks, issued_at=time.time())
        self.client.publish(self.ns.desired(proplet_id), desired.encode(), retain=True)
        return gen

    def state(self, proplet_id: str) -> ReportedState:
        with self._cond:
            return self.observed.states[proplet_id]

    def task_status(self, proplet_id: str, name: str) -> TaskStatus | None:
        state = self.observed.states.get(proplet_id)
        if state is None:
            return None
        return next((t for t in state.tasks if t.name == name), None)

    def wait(
        self,
        predicate: Callable[[Observed], T],
        *,
        timeout: float = 10.0,
        what: str = "condition",
        proplet: Proplet | None = None,
    ) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self.observed)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logs = proplet.log()[-3000:] if proplet else ""
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {what}; "
                        f"states={self.observed.states}\n{logs}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def wait_task(
        self, proplet_id: str, name: str, predicate: Callable[[TaskStatus], bool], **kw: Any
    ) -> TaskStatus:
        def check(_o: Observed) -> TaskStatus | None:
            status = self.task_status(proplet_id, name)
            return status if status is not None and predicate(status) else None

        return self.wait(check, what=f"task {name} on {proplet_id}", **kw)

    def wait_result(self, proplet_id: str, name: str, **kw: Any) -> TaskResult:
        def check(o: Observed) -> TaskResult | None:
            return o.results.get((proplet_id, name))

        return self.wait(check, what=f"result of {name} on {proplet_id}", **kw)

    def close(self) -> None:
        for proplet in self.proplets:
            proplet.kill()
        self.server.stop()
        self.client.close()

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        try:
            parsed = self.ns.parse(topic)
            with self._cond:
                o = self.observed
                if parsed.kind is Kind.STATE and payload:
                    o.states[parsed.proplet] = decode(ReportedState, payload)
                elif parsed.kind is Kind.RESULT:
                    key = (parsed.proplet, parsed.task)
                    o.results[key] = decode(TaskResult, payload) if payload else None
                elif parsed.kind is Kind.PRESENCE and payload:
                    o.presence[parsed.proplet] = decode(Presence, payload).online
                elif parsed.kind is Kind.HEARTBEAT:
                    o.heartbeats.setdefault(parsed.proplet, []).append(decode(Heartbeat, payload))
                elif parsed.kind is Kind.ANNOUNCE:
                    o.announces[parsed.proplet] = o.announces.get(parsed.proplet, 0) + 1
                self._cond.notify_all()
        except (TopicError, DecodeError):
            pass  # the tests publish malformed messages on purpose


@contextmanager
def running_fleet(broker: Mosquitto, tmp: Path, **settings: Any) -> Iterator[Fleet]:
    fleet = Fleet(broker, tmp, **settings)
    try:
        yield fleet
    finally:
        fleet.close()
