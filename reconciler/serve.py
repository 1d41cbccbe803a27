"""``propctl serve``: the same reconcile pass, run by a timer, by push webhooks and by liveness.

One long-lived broker connection and fleet view; one artifact server for the modules of the last
good revisions; passes strictly one at a time, triggers coalesced into at most one queued pass.
A revision that fails validation changes nothing; an unreachable Git remote or broker is
reported and retried, never fatal. Status is written in one place, after each pass.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.artifacts import ArtifactServer
from reconciler.broker import Broker, FleetUnreachable
from reconciler.coordinator import Coordinator, with_jobs
from reconciler.desired import DesiredState
from reconciler.images import resolve_images
from reconciler.inventory import task_rows
from reconciler.loader import InvalidManifests, load
from reconciler.lock import fleet_lock, lock_path
from reconciler.metrics import ServeMetrics, serve_metrics
from reconciler.observe import FleetData, FleetView, Liveness, liveness
from reconciler.observed import ObservedState
from reconciler.plan import DEFAULT_OWNER
from reconciler.reconcile import (
    PassOptions,
    PassResult,
    fleet_key,
    issuer,
    job_key,
    module_reader,
    run_pass,
)
from reconciler.registry import RegistryClient
from reconciler.source import GitSource, Revision, SourceError, default_cache_dir
from reconciler.webhook import Push
from schemas.connection import BrokerSettings
from schemas.messages import DesiredSet, ReconcilerStatus, decode

log = logging.getLogger(__name__)

HEARTBEAT_MISSES = 3


@dataclass(frozen=True, slots=True)
class ServeOptions:
    interval: float = 60.0
    jitter: float = 0.1  # each wait is the interval times 1 +/- this fraction
    prune: bool = False
    pass_timeout: float = 30.0
    lost_after: float = 15.0  # offline this long: unpinned tasks move elsewhere
    # A triggered pass starts at once unless the previous one started less than this ago; then
    # it starts this long after it, so a burst of pushes costs at most two passes a second.
    min_gap: float = 1.0
    state_dir: Path = Path(".")
    cache_dir: Path | None = None
    insecure_registry: bool = False


class Triggers:
    """Pass requests, coalesced: whatever arrives while a pass runs becomes one queued pass."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queued: list[str] = []
        self._woken = False
        self.coalesced = 0

    def request(self, reason: str) -> bool:
        """Queue a pass; False when one is queued already (this request joins it)."""
        with self._cond:
            if self._queued:
                self._queued.append(reason)
                self.coalesced += 1
                return False
            self._queued.append(reason)
            self._cond.notify_all()
            return True

    def wait(self, timeout: float) -> list[str]:
        """The reasons of the queued pass, or [] when ``timeout`` passed or ``wake`` was called."""
        with self._cond:
            self._cond.wait_for(
                lambda: bool(self._queued) or self._woken, timeout=max(0.0, timeout)
            )
            self._woken = False
            reasons, self._queued = self._queued, []
            return reasons

    def wake(self) -> None:
        """End a ``wait`` now (shutdown), whether or not a pass is queued."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()


@dataclass
class ServeState:
    """What survives a restart (kept in the state dir) and what status reports."""

    last_attempted_revision: str | None = None
    last_applied_revision: str | None = None
    last_error: str | None = None
    in_sync: bool = False
    last_pass_at: float | None = None
    last_pass_seconds: float | None = None
    passes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def save(self, path: Path) -> None:
        body = {
            "last_attempted_revision": self.last_attempted_revision,
            "last_applied_revision": self.last_applied_revision,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ServeState:
        try:
            body = json.loads(path.read_text())
            return cls(body.get("last_attempted_revision"), body.get("last_applied_revision"))
        except (OSError, ValueError, AttributeError):
            return cls()


class Server:
    """The serve loop. ``run()`` blocks until ``stop()``; a pass in flight always finishes."""

    def __init__(
        self,
        source: GitSource,
        settings: BrokerSettings,
        options: ServeOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_pass: Callable[[PassResult | None, ServeState], None] | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.options = options
        self.clock = clock
        self.on_pass = on_pass
        self.triggers = Triggers()
        self.view = FleetView(settings.namespace)
        self.broker = Broker(settings, on_reconnect=self._on_reconnect)
        options.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = options.state_dir / "serve.json"
        self.state = ServeState.load(self.state_path)
        self._stopping = threading.Event()
        self._connected = False
        self._modules: dict[str, Callable[[str], bytes | None]] = {}
        self._reader: Callable[[str], bytes | None] | None = None
        self._previous_reader: Callable[[str], bytes | None] | None = None
        self.server = ArtifactServer(self.broker, settings.namespace, self._lookup)
        self.coordinator = Coordinator(
            self.broker,
            settings.namespace,
            options.state_dir,
            name=issuer(),
            owner=DEFAULT_OWNER,
            progress=lambda line: log.info("%s", line),
            wake=self._job_event,
            modules=self._lookup,
            insecure_registry=self.options.insecure_registry,
        )
        # The last revision that passed, reused by passes that only move a job's rounds.
        self._last: tuple[Revision, DesiredState] | None = None
        self._job_plan: tuple[object, ...] = ((), ())
        self.ready = threading.Event()
        self.metrics: ServeMetrics = serve_metrics()
        self._result = "applied"
        self._pass_started = 0.0
        self._last_pass_start = float("-inf")
        # Sets the broker lost in a restart, remembered from before it: published again as
        # they were, so the next pass moves nothing.
        self._restore_sets: dict[str, DesiredSet] = {}
        # The liveness the last pass planned with: a pass is due when it changes.
        self._passed_liveness: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())

    # Control.
    def stop(self) -> None:
        self._stopping.set()
        self.triggers.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _on_reconnect(self) -> None:
        # The broker may have lost every retained message: rebuild the snapshot, pass again.
        self.view.reset()
        self.triggers.request("broker reconnected")

    def _lookup(self, digest: str) -> bytes | None:
        for reader in (self._reader, self._previous_reader):
            if reader is not None:
                content = reader(digest)
                if content is not None:
                    return content
        return self.coordinator.lookup(digest)

    def _job_event(self, reason: str) -> None:
        self.triggers.request(f"{JOB_REASON}{reason}")

    def _jobs_moved(self) -> bool:
        """Whether a job's rounds changed since the last pass (a round closed or timed out)."""
        if self._last is None or not self.coordinator.runs:
            return False
        tasks, retired = self.coordinator.step(self._observed())
        return job_key(tasks, retired) != self._job_plan

    def _job_deadline(self) -> float | None:
        """The next round deadline on this loop's clock."""
        deadline = self.coordinator.next_deadline()
        return None if deadline is None else self.clock() + (deadline - time.time())

    # Loop.
    def run(self) -> None:
        self.triggers.request("start")
        next_timer = self.clock() + self._interval()
        try:
            while not self.stopping:
                if not self._connected and not self._connect():
                    self._stopping.wait(min(5.0, self.options.interval))
                    continue
                timeout = next_timer - self.clock()
                for change in (self._next_liveness_change(), self._job_deadline()):
                    if change is not None:
                        timeout = min(timeout, change - self.clock())
                reasons = self.triggers.wait(timeout)
                if self.stopping:
                    break
                jobs_only = bool(reasons) and all(r.startswith(JOB_REASON) for r in reasons)
                if jobs_only and not self._jobs_moved():
                    continue  # a result or upload arrived, and the round goes on
                if not reasons:
                    if self.clock() >= next_timer:
                        reasons = ["timer"]
                    elif self._liveness_key() != self._passed_liveness:
                        reasons = ["fleet liveness changed"]
                    elif self._jobs_moved():
                        reasons = [f"{JOB_REASON}round deadline"]
                        jobs_only = True
                    else:
                        continue
                if jobs_only:
                    # A round's next step waits for no one: it reuses the last revision.
                    self.pass_once(f"{JOB_REASON}round", reuse=True)
                    continue
                gap = self._last_pass_start + self.options.min_gap - self.clock()
                if gap > 0 and reasons != ["timer"]:
                    self._stopping.wait(gap)
                    reasons += self.triggers.wait(0)
                    if self.stopping:
                        break
                self._last_pass_start = self.clock()
                self.pass_once(", ".join(sorted(set(reasons))))
                next_timer = self.clock() + self._interval()
        finally:
            self.server.stop()
            if self._connected:
                self.broker.close()

    def _interval(self) -> float:
        spread = self.options.jitter * self.options.interval
        return self.options.interval + random.uniform(-spread, spread)

    def _connect(self) -> bool:
        try:
            self.broker.connect()
            self.view.attach(self.broker)
            self.coordinator.attach()  # the broker renews its subscriptions on reconnects
        except FleetUnreachable as exc:
            self.state.last_error = str(exc)
            log.warning("%s; retrying", exc)
            return False
        self.server.start()
        self._connected = True
        self.ready.set()
        return True

    def _liveness(self, data: FleetData) -> Liveness:
        return liveness(
            data, self.clock(), misses=HEARTBEAT_MISSES, lost_after=self.options.lost_after
        )

    def _next_liveness_change(self) -> float | None:
        return self.view.read(self._liveness).next_change

    def _liveness_key(self) -> tuple[frozenset[str], frozenset[str]]:
        live = self.view.read(self._liveness)
        return live.alive, live.lost

    def _observe(self) -> ObservedState:
        """The fleet as a pass plans with it; remembers the liveness the pass used."""
        return self._observed(plan=True)

    def _observed(self, *, plan: bool = False) -> ObservedState:
        def judge(data: FleetData) -> ObservedState:
            live = self._liveness(data)
            if plan:
                self._passed_liveness = (live.alive, live.lost)
            desired = {**self._restore_sets, **data.desired}
            return ObservedState.from_messages(data.reported, desired, live.alive, live.lost)

        return self.view.read(judge)

    def pass_once(self, reason: str, *, reuse: bool = False) -> PassResult | None:
        """One pass; every failure is recorded in the state, none escapes.

        ``reuse`` passes with the last revision that passed instead of fetching again.
        """
        started = time.time()
        mark = self._pass_started = self.clock()
        log.info("pass (%s)", reason)
        result: PassResult | None = None
        self._result = "failed"
        try:
            if not self.broker.connected:
                raise FleetUnreachable(f"not connected to {self.settings.url}; reconnecting")
            revision, desired = self._last if reuse and self._last else self._fetch()
            if desired is not None:
                cache_dir = self.options.cache_dir or default_cache_dir()
                lock = lock_path(cache_dir, fleet_key(self.settings))
                with fleet_lock(lock, on_wait=lambda m: log.info("%s", m)):
                    result = self._converge(revision, desired)
        except FleetUnreachable as exc:
            self.state.last_error = f"broker: {exc}"
            self._result = "unreachable"
            self.metrics.errors.inc(stage="observe")
            log.warning("pass failed: %s", exc)
        finally:
            self._record(result)
            self.state.passes += 1
            self.state.last_pass_at = started
            self.state.last_pass_seconds = self.clock() - mark
            self.state.save(self.state_path)
            self._publish_status()
            if self.on_pass is not None:
                self.on_pass(result, self.state)
        return result

    def _fetch(self) -> tuple[Revision | None, DesiredState | None]:
        try:
            revision = self.source.fetch()
        except SourceError as exc:
            self._result = "unreachable"
            self.metrics.errors.inc(stage="fetch")
            self.state.last_error = f"fetch: {exc}"
            self.state.in_sync = False
            log.warning("fetch failed: %s (last applied revision %s stays in force)", exc,
                        self.state.last_applied_revision)  # fmt: skip
            return None, None
        self.state.last_attempted_revision = revision.id
        try:
            desired = load(revision.files, revision.read, revision.id)
            if any(task.image is not None for task in desired.all_tasks):
                with RegistryClient.from_env(insecure=self.options.insecure_registry) as client:
                    desired = resolve_images(desired, client)
        except InvalidManifests as exc:
            self._result = "invalid"
            self.metrics.errors.inc(stage="load")
            first = exc.problems[0] if exc.problems else None
            count = len(exc.problems)
            self.state.last_error = (
                f"revision {revision.short} rejected, nothing changed:"
                f" {count} problem(s); first: {first}"
            )
            self.state.in_sync = False
            log.error("revision %s rejected; nothing changes:\n%s", revision.short, exc)
            return None, None
        return revision, desired

    def _converge(self, revision: Revision | None, desired: DesiredState) -> PassResult:
        assert revision is not None
        if self.view.stale:
            self.view.resync(self.broker)
            fresh = self.view.read(lambda d: set(d.desired))
            self._restore_sets = {p: s for p, s in self.view.remembered.items() if p not in fresh}
            self.view.remembered = {}
            if self._restore_sets:
                log.info("the broker lost %d desired set(s); publishing them again",
                         len(self._restore_sets))  # fmt: skip
        reader = module_reader(revision, desired)
        if reader is not self._reader:
            self._previous_reader, self._reader = self._reader, reader
        options = PassOptions(
            prune=self.options.prune, wait=False, timeout=self.options.pass_timeout
        )
        self._last = (revision, desired)
        self.coordinator.set_jobs(desired, revision.read)
        observed = self._observe()
        tasks, retired = self.coordinator.step(observed)
        self._job_plan = job_key(tasks, retired)
        result = run_pass(
            self.broker,
            self.view,
            with_jobs(desired, tasks, retired),
            options,
            lambda line: log.info("%s", line),
            {},
            observe=lambda: observed,
            republish=self._restore_sets.keys(),
        )
        self._restore_sets = {}
        self.state.last_applied_revision = revision.id
        self._result = "failed" if result.failed else "applied"
        self.state.in_sync = result.in_sync
        self.state.last_error = None
        self.state.outcomes.update(o.outcome for o in result.outcomes)
        return result

    def _record(self, result: PassResult | None) -> None:
        """Metrics of a finished pass (the one place they are written)."""
        m = self.metrics
        m.passes.inc(result=self._result)
        m.pass_duration.observe(self.clock() - self._pass_started)
        m.last_pass.set(time.time())
        if result is not None:
            for outcome in result.outcomes:
                m.actions.inc(outcome=outcome.outcome)
        if self._connected:
            observed = self._observed()
            m.proplets_alive.set(sum(1 for p in observed.proplets.values() if p.alive))
            states = Counter(row.state for row in self.view.read(task_rows))
            m.tasks.replace({(state,): float(n) for state, n in states.items()})

    # Webhooks.
    def on_push(self, push: Push) -> tuple[bool, str]:
        """Queue a pass for a push to the served ref; acknowledge and ignore any other."""
        served = self.source.ref or self.source.default_branch
        if not _ref_matches(push.ref, served):
            return False, f"push to {push.ref} ignored: serving {served}"
        queued = self.triggers.request(f"{push.provider} push")
        return True, "pass queued" if queued else "joined the queued pass"

    def status(self) -> ReconcilerStatus:
        rows = self.view.read(task_rows)
        observed = self._observed()
        alive = sum(1 for p in observed.proplets.values() if p.alive)
        return ReconcilerStatus(
            reconciler=issuer(),
            source=f"{self.source.url}@{self.source.ref or 'HEAD'}:{self.source.path or '.'}",
            last_attempted_revision=self.state.last_attempted_revision,
            last_applied_revision=self.state.last_applied_revision,
            in_sync=self.state.in_sync,
            last_error=(self.state.last_error or "")[:4096] or None,
            last_pass_at=self.state.last_pass_at,
            last_pass_seconds=self.state.last_pass_seconds,
            passes=self.state.passes,
            proplets=len(observed.proplets),
            proplets_alive=alive,
            tasks=dict(Counter(row.state for row in rows)),
            ts=time.time(),
        )

    def _publish_status(self) -> None:
        if not self._connected or not self.broker.connected:
            return  # paho would queue it and send a stale status after reconnecting
        info = self.broker.publish(
            self.settings.namespace.status(), self.status().encode(), retain=True
        )
        try:
            info.wait_for_publish(timeout=5)
        except (RuntimeError, ValueError) as exc:
            log.warning("status not published: %s", exc)


JOB_REASON = "job: "


def _ref_matches(pushed: str | None, served: str | None) -> bool:
    """A push without a ref, or to the served branch or tag (any ref before HEAD is known)."""
    if pushed is None or served is None or pushed == served:
        return True
    return pushed in (f"refs/heads/{served}", f"refs/tags/{served}")


def read_status(broker: Broker, timeout: float = 5.0) -> ReconcilerStatus | None:
    """The retained status of the serving reconciler of this namespace, if there is one."""
    ns = broker.settings.namespace
    found: list[bytes] = []
    done = threading.Event()
    marker = f"{ns.root}/observers/{broker.client_id}"
    broker.subscribe(marker, lambda _t, _p, _r: done.set())
    broker.subscribe(ns.status(), lambda _t, payload, _r: found.append(payload))
    broker.publish(marker, b"end", qos=0)
    if not done.wait(timeout):
        raise FleetUnreachable(f"no answer from {broker.settings.url} in {timeout}s")
    if not found or not found[-1]:
        return None
    return decode(ReconcilerStatus, found[-1])
