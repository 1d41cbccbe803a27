"""The live fleet as this reconciler sees it, built from retained and live MQTT messages.

Subscribing delivers every retained message at once: that is the snapshot. Subscriptions use
QoS 0 because brokers cap the per-client queue of QoS 1 messages (Mosquitto's default of 1,000
silently drops the rest of a large fleet). The observer then publishes a marker to its own topic;
it arrives after the last retained message, so it marks the end of the snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from reconciler.broker import Broker, FleetUnreachable
from reconciler.observed import ObservedState
from schemas.messages import (
    DecodeError,
    DesiredSet,
    Heartbeat,
    Presence,
    ReportedState,
    TaskResult,
    decode,
)
from schemas.topics import Kind, Namespace, TopicError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class FleetData:
    """Everything the view holds; read it only through ``FleetView.read`` or ``wait``."""

    reported: dict[str, ReportedState] = field(default_factory=dict)
    desired: dict[str, DesiredSet] = field(default_factory=dict)
    presence: dict[str, bool] = field(default_factory=dict)
    results: dict[tuple[str, str], TaskResult] = field(default_factory=dict)
    last_heartbeat: dict[str, float] = field(default_factory=dict)
    heartbeat_interval: dict[str, float] = field(default_factory=dict)
    presence_at: dict[str, float] = field(default_factory=dict)  # when presence last changed
    since: float = 0.0  # when this view started (clock of the view)
    dropped: int = 0

    def observed(self) -> ObservedState:
        alive = {p for p, online in self.presence.items() if online}
        return ObservedState.from_messages(self.reported, self.desired, alive)

    def proplets(self) -> set[str]:
        return set(self.reported) | set(self.desired) | set(self.presence)


@dataclass(frozen=True, slots=True)
class Liveness:
    """Who is alive, who is lost, and when the next of them may change."""

    alive: frozenset[str]
    lost: frozenset[str]
    next_change: float | None


def liveness(data: FleetData, now: float, *, misses: int, lost_after: float) -> Liveness:
    """Judge liveness over several heartbeats, with hysteresis.

    A proplet is alive while it is connected (its presence says so) and has not missed
    ``misses`` heartbeats in a row. It is lost once it has not been alive for ``lost_after``
    seconds: a proplet that blinks (reconnects quickly) never becomes lost, so its tasks stay.
    """
    alive: set[str] = set()
    lost: set[str] = set()
    changes: list[float] = []
    for proplet in data.proplets():
        online = data.presence.get(proplet, False)
        down_since: float | None = None
        if not online:
            down_since = data.presence_at.get(proplet, data.since)
        else:
            last = data.last_heartbeat.get(proplet)
            interval = data.heartbeat_interval.get(proplet)
            if last is not None and interval is not None:
                silent_at = last + misses * interval
                if now >= silent_at:
                    down_since = silent_at
                else:
                    changes.append(silent_at)
        if down_since is None:
            alive.add(proplet)
        elif now - down_since >= lost_after:
            lost.add(proplet)
        else:
            changes.append(down_since + lost_after)
    return Liveness(frozenset(alive), frozenset(lost), min(changes) if changes else None)


class FleetView:
    """A live, thread-safe picture of one namespace, fed by the broker's network thread."""

    def __init__(self, namespace: Namespace, clock: Callable[[], float] = time.monotonic) -> None:
        self.ns = namespace
        self.clock = clock
        self.data = FleetData()
        self._cond = threading.Condition()
        self._marker = f"{namespace.root}/observers/{uuid.uuid4().hex[:16]}"
        self._snapshot_done = threading.Event()
        self.data.since = clock()
        self.stale = False
        self.remembered: dict[str, DesiredSet] = {}

    def attach(self, broker: Broker, *, results: bool = False, timeout: float = 10.0) -> None:
        """Subscribe and wait until every retained message has arrived."""
        broker.subscribe(self._marker, self._on_marker, qos=0)
        broker.subscribe(f"{self.ns.root}/proplets/+/+", self._on_message, qos=0)
        if results:
            broker.subscribe(self.ns.fleet_results(), self._on_message, qos=0)
        broker.publish(self._marker, b"end", qos=0)
        if not self._snapshot_done.wait(timeout):
            raise FleetUnreachable(f"no fleet snapshot from {broker.settings.url} in {timeout}s")

    def reset(self) -> None:
        """Forget everything (the broker restarted): the next ``resync`` rebuilds the snapshot.

        The desired sets seen so far are kept in ``remembered``: a broker that restarted
        without persistence lost them, and the reconciler must publish them again as they were.
        """
        with self._cond:
            self.remembered = {**self.remembered, **self.data.desired}
            self.data = FleetData(since=self.clock())
            self._snapshot_done.clear()
            self.stale = True

    def resync(self, broker: Broker, timeout: float = 10.0) -> None:
        """Wait for a fresh snapshot after ``reset`` (subscriptions were renewed on reconnect)."""
        broker.publish(self._marker, b"end", qos=0)
        if not self._snapshot_done.wait(timeout):
            raise FleetUnreachable(f"no fleet snapshot from {broker.settings.url} in {timeout}s")
        self.stale = False

    def read(self, reader: Callable[[FleetData], T]) -> T:
        with self._cond:
            return reader(self.data)

    def observed(self) -> ObservedState:
        return self.read(FleetData.observed)

    def wait(self, predicate: Callable[[FleetData], bool], timeout: float) -> bool:
        """Wait until ``predicate`` holds; False when ``timeout`` passed first."""
        deadline = self.clock() + timeout
        with self._cond:
            while not predicate(self.data):
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.25))
            return True

    def _on_marker(self, _topic: str, _payload: bytes, _retained: bool) -> None:
        self._snapshot_done.set()

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        try:
            parsed = self.ns.parse(topic)
        except TopicError:
            return
        try:
            with self._cond:
                self._apply(parsed.kind, parsed.proplet, parsed.task, payload)
                self._cond.notify_all()
        except DecodeError as exc:
            with self._cond:
                self.data.dropped += 1
            log.warning("dropped message on %s: %s", topic, exc)

    def _apply(self, kind: Kind, proplet: str, task: str, payload: bytes) -> None:
        data = self.data
        if kind is Kind.STATE:
            if payload:
                data.reported[proplet] = decode(ReportedState, payload)
            else:
                data.reported.pop(proplet, None)
        elif kind is Kind.DESIRED:
            if payload:
                data.desired[proplet] = decode(DesiredSet, payload)
            else:
                data.desired.pop(proplet, None)
        elif kind is Kind.PRESENCE and payload:
            online = decode(Presence, payload).online
            if data.presence.get(proplet) != online:
                data.presence_at[proplet] = self.clock()
            data.presence[proplet] = online
        elif kind is Kind.HEARTBEAT:
            beat = decode(Heartbeat, payload)
            data.last_heartbeat[proplet] = self.clock()
            data.heartbeat_interval[proplet] = beat.interval_s
        elif kind is Kind.RESULT:
            if payload:
                data.results[(proplet, task)] = decode(TaskResult, payload)
            else:
                data.results.pop((proplet, task), None)
