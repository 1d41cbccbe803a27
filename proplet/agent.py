"""The proplet agent: converges its task table to the desired set and reports what it holds.

All decisions run on one thread, fed by a queue: MQTT messages (from ``session``), finished runs
(from worker threads), finished registry pulls (from pull threads) and timers. Wasm runs on a
pool of worker threads, one per running task; they only publish their result and post their
outcome back. The session is the only owner of the broker connection.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from proplet import __version__, files
from proplet.artifacts import ArtifactStore, DigestMismatch
from proplet.journal import Journal, Memory, TaskMemory
from proplet.registry import Backoff, Pull, Pulls, RegistryError, RegistryPuller
from proplet.runtime import (
    Execution,
    Invocation,
    Limits,
    ModuleError,
    Outcome,
    Runtime,
    Status,
)
from proplet.session import Session
from proplet.transfer import Timing, Transfers
from schemas.connection import BrokerSettings
from schemas.messages import (
    Announce,
    ArtifactOffer,
    ArtifactRef,
    ArtifactRequest,
    DecodeError,
    DesiredSet,
    DesiredTask,
    Heartbeat,
    Presence,
    ReportedState,
    TaskResult,
    TaskState,
    TaskStatus,
    TerminalState,
    decode,
)
from schemas.messages import Runtime as RuntimeKind
from schemas.topics import Kind, Namespace, TopicError

log = logging.getLogger(__name__)

SUMMARY_CHARS = 200
DAEMON_BACKOFF_INITIAL = 1.0
DAEMON_BACKOFF_MAX = 30.0
# A daemon that ran this long before exiting is restarted without accumulated backoff.
DAEMON_HEALTHY_RUN = 10.0
# Reported-state changes within this window go out as one message, after a short task's result.
STATE_DEBOUNCE = 0.005
DEFAULT_CACHE_BYTES = 1024**3


@dataclass(frozen=True, slots=True)
class AgentConfig:
    proplet_id: str
    labels: dict[str, str] = field(default_factory=dict)
    data_dir: Path = Path("proplet-data")
    cache_dir: Path | None = None
    max_tasks: int = 16
    heartbeat_s: float = 5.0
    chunk_size: int = 256 * 1024
    output_bytes: int = 64 * 1024
    transfer_timing: Timing = field(default_factory=Timing)
    # Bound on the stored modules (None: unbounded); least recently used go first.
    cache_bytes: int | None = DEFAULT_CACHE_BYTES
    pull_backoff: Backoff = field(default_factory=Backoff)

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "agent"

    @property
    def guest_data_dir(self) -> Path:
        """Local data exposed read-only to tasks at ``/data``."""
        return self.data_dir / "data"

    @property
    def artifact_dir(self) -> Path:
        return self.cache_dir or (self.data_dir / "cache")

    @property
    def runs_dir(self) -> Path:
        """Per-run workspaces: the inputs staged for /in and the directory behind /out."""
        return self.data_dir / "runs"


class Run:
    """One execution attempt, shared between the agent thread and its worker thread."""

    def __init__(self, run_id: int, number: int, started_at: float) -> None:
        self.id = run_id
        self.number = number  # this spec's run count, including this one
        self.started_at = started_at
        self._lock = threading.Lock()
        self._execution: Execution | None = None
        self._stop_requested = False

    def attach(self, execution: Execution) -> bool:
        """Register the execution; False if a stop came first (then do not run it)."""
        with self._lock:
            self._execution = execution
            return not self._stop_requested

    @property
    def stop_requested(self) -> bool:
        with self._lock:
            return self._stop_requested

    def stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            execution = self._execution
        if execution is not None:
            execution.stop()


@dataclass(slots=True)
class Task:
    spec: DesiredTask
    memory: TaskMemory
    state: TaskState = TaskState.PENDING
    reason: str | None = None
    run: Run | None = None
    last_result: TaskResult | None = None
    removing: bool = False
    replacement: DesiredTask | None = None
    restart_at: float | None = None
    failures_in_row: int = 0


class Agent:
    """One proplet. ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        config: AgentConfig,
        settings: BrokerSettings,
        runtime: Runtime,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        registry: RegistryPuller | None = None,
    ) -> None:
        self.config = config
        self.ns: Namespace = settings.namespace
        self.runtime = runtime
        self.store = ArtifactStore(
            config.artifact_dir, max_bytes=config.cache_bytes, pinned=self._pinned
        )
        # With a registry client, modules of tasks that name an image are pulled from it
        # directly (--pull direct); without one, every module comes over MQTT (--pull mqtt).
        self.registry = registry
        self.pulls = Pulls(config.pull_backoff)
        self.journal = Journal(config.state_dir)
        self.clock = clock
        self.monotonic = monotonic
        self.transfers = Transfers(config.proplet_id, config.chunk_size, config.transfer_timing)
        self.tasks: dict[str, Task] = {}
        self.memory = Memory()
        self._events: queue.SimpleQueue[tuple[object, ...]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._run_ids = 0
        self._heartbeat_seq = 0
        self._next_heartbeat = 0.0
        self._dirty = False
        self._journal_dirty = False
        self._state_due: float | None = None
        self._workers = ThreadPoolExecutor(config.max_tasks, thread_name_prefix="task")
        self.started = threading.Event()
        pid = config.proplet_id
        offline = Presence(proplet=pid, online=False).encode()
        self.session = Session(
            settings,
            # Unique per namespace: the same id in two channels must not take each other's session.
            client_id=f"proplet-{self.ns.domain}-{self.ns.channel}-{pid}",
            subscriptions=[
                (self.ns.desired(pid), 1),
                (f"{self.ns.proplet_root(pid)}/artifacts/#", 1),
            ],
            on_message=lambda topic, payload, _retained: self._events.put(
                ("message", topic, payload)
            ),
            on_connected=lambda: self._events.put(("connected",)),
            will=(self.ns.presence(pid), offline),
            keepalive=max(2, int(config.heartbeat_s * 3)),
        )

    # Lifecycle.
    def run(self) -> None:
        self._restore()
        self.store.trim()  # the bound may have shrunk since the last run
        files.clear(self.config.runs_dir)
        self.session.start()
        self._next_heartbeat = self.monotonic()
        self._schedule()
        self.started.set()
        while not self._stopping.is_set():
            event = self._next_event()
            while event is not None:
                self._handle(event)
                event = self._poll_event()
            self._tick()
        self._shutdown()

    def stop(self) -> None:
        self._stopping.set()
        self._events.put(("wake",))

    def _shutdown(self) -> None:
        # Interrupted runs stay marked in progress in the journal, so they run again on restart.
        for task in self.tasks.values():
            if task.run is not None:
                task.run.stop()
        if self.session.connected:
            info = self.session.publish(
                self.ns.presence(self.config.proplet_id),
                Presence(proplet=self.config.proplet_id, online=False).encode(),
                retain=True,
            )
            # A clean disconnect sends no will: the broker must have this before we leave.
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline presence not confirmed: %s", exc)
        self.session.stop()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._save_journal()
        self.journal.flush()

    def _next_event(self) -> tuple[object, ...] | None:
        deadlines = [self._next_heartbeat]
        if self._state_due is not None:
            deadlines.append(self._state_due)
        transfer_deadline = self.transfers.next_deadline()
        if transfer_deadline is not None:
            deadlines.append(transfer_deadline)
        pull_deadline = self.pulls.next_deadline()
        if pull_deadline is not None:
            deadlines.append(pull_deadline)
        deadlines += [t.restart_at for t in self.tasks.values() if t.restart_at is not None]
        timeout = max(0.0, min(deadlines) - self.monotonic())
        try:
            return self._events.get(timeout=min(timeout, 1.0))
        except queue.Empty:
            return None

    def _poll_event(self) -> tuple[object, ...] | None:
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, event: tuple[object, ...]) -> None:
        kind = event[0]
        if kind == "message":
            topic, payload = event[1], event[2]
            assert isinstance(topic, str) and isinstance(payload, bytes)
            self._on_message(topic, payload)
        elif kind == "finished":
            name, run_id, outcome, result = event[1], event[2], event[3], event[4]
            assert isinstance(name, str) and isinstance(run_id, int)
            assert isinstance(outcome, Outcome) and isinstance(result, TaskResult)
            self._on_finished(name, run_id, outcome, result)
        elif kind == "pulled":
            digest, path, error = event[1], event[2], event[3]
            assert isinstance(digest, str) and (path is None or isinstance(path, Path))
            assert error is None or isinstance(error, RegistryError)
            self._on_pulled(digest, path, error)
        elif kind == "connected":
            self._on_connected()

    def _tick(self) -> None:
        now = self.monotonic()
        for request in self.transfers.due(now):
            self._send_request(request)
        self._schedule()
        if now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.config.heartbeat_s
        self._save_journal()
        if self._dirty:
            if self._state_due is None:
                self._state_due = now + STATE_DEBOUNCE
            elif now >= self._state_due:
                self._publish_state()

    # Messages.
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self.ns.parse(topic)
            if parsed.proplet != self.config.proplet_id:
                raise TopicError(f"topic {topic!r} is not addressed to this proplet")
            if parsed.kind is Kind.DESIRED:
                if not payload:
                    log.warning(
                        "retained desired set cleared on the broker; keeping %d tasks",
                        len(self.tasks),
                    )
                    return
                self._apply(decode(DesiredSet, payload))
            elif parsed.kind is Kind.ARTIFACT_OFFER:
                offer = decode(ArtifactOffer, payload)
                if offer.digest != "sha256:" + parsed.digest_hex:
                    raise DecodeError("offer digest does not match its topic")
                self._on_offer(offer)
            elif parsed.kind is Kind.ARTIFACT_CHUNK:
                self._on_chunk("sha256:" + parsed.digest_hex, parsed.index, payload)
            else:
                raise TopicError(f"unexpected topic {topic!r}")
        except (DecodeError, TopicError) as exc:
            log.warning("dropped message on %s: %s", topic, exc)

    def _apply(self, desired: DesiredSet) -> None:
        current = self.memory.desired
        current_gen = current.generation if current is not None else 0
        if desired.generation < current_gen:
            log.info(
                "ignored desired set generation %d: already applied %d",
                desired.generation,
                current_gen,
            )
            return
        if current is not None and desired.generation == current_gen:
            if desired.tasks != current.tasks:
                log.warning(
                    "ignored a different desired set with the same generation %d", current_gen
                )
            return
        wanted = {t.name: t for t in desired.tasks}
        for name, task in list(self.tasks.items()):
            spec = wanted.get(name)
            if spec is None:
                self._remove(task)
            elif spec.spec_hash != task.spec.spec_hash:
                self._replace(task, spec)
            else:
                task.spec = spec
        for name, spec in wanted.items():
            if name not in self.tasks:
                memory = TaskMemory(spec_hash=spec.spec_hash)
                self.memory.tasks[name] = memory
                self.tasks[name] = Task(spec=spec, memory=memory)
        self.memory.desired = desired
        self._journal_dirty = True
        self._dirty = True
        log.info("applied desired set generation %d (%d tasks)", desired.generation, len(wanted))

    def _remove(self, task: Task) -> None:
        task.replacement = None
        if task.run is not None:
            task.removing = True
            task.run.stop()
            return
        self._forget(task)

    def _forget(self, task: Task) -> None:
        name = task.spec.name
        self.tasks.pop(name, None)
        self.memory.tasks.pop(name, None)
        self.session.publish(self.ns.result(self.config.proplet_id, name), b"", retain=True)
        self._drop_fetches(task.spec)
        self._dirty = True

    def _replace(self, task: Task, spec: DesiredTask) -> None:
        if task.run is not None:
            task.replacement = spec
            task.run.stop()
            return
        self._reset(task, spec)

    def _reset(self, task: Task, spec: DesiredTask) -> None:
        memory = TaskMemory(spec_hash=spec.spec_hash)
        self.memory.tasks[spec.name] = memory
        self.tasks[spec.name] = Task(spec=spec, memory=memory)
        self._drop_fetches(task.spec)
        self._dirty = True

    def _drop_fetches(self, old: DesiredTask) -> None:
        """Stop fetching the artifacts of ``old`` that no task needs any more."""
        needed: set[str] = set()
        for task in self.tasks.values():
            needed.update(_artifacts(task.spec))
            if task.replacement is not None:
                needed.update(_artifacts(task.replacement))
        for digest in _artifacts(old):
            if digest not in needed:
                self.transfers.drop(digest)
                self.pulls.drop(digest)

    # Artifacts.
    def _on_offer(self, offer: ArtifactOffer) -> None:
        error = self.transfers.on_offer(offer, self.monotonic())
        if error is None:
            return
        for task in self._tasks_needing(offer.digest):
            task.state = TaskState.FAILED
            task.reason = f"artifact {offer.digest} unavailable: {error} (retrying)"
        self._dirty = True

    def _on_chunk(self, digest: str, index: int, data: bytes) -> None:
        content = self.transfers.on_chunk(digest, index, data, self.monotonic())
        if content is None:
            return
        try:
            self.store.put(digest, content)
        except DigestMismatch as exc:  # Transfers verified it already; a disk fault is possible.
            log.error("artifact %s not stored: %s", digest, exc)
            return
        log.info("artifact %s received (%d bytes)", digest, len(content))

    def _tasks_needing(self, digest: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.spec.digest == digest and t.run is None]

    def _send_request(self, request: ArtifactRequest) -> None:
        self.session.publish(self.ns.artifact_request(), request.encode())
        for task in self._tasks_needing(request.digest):
            wanted = self.transfers.waiting(request.digest)
            if task.state is not TaskState.FAILED:
                task.state = TaskState.PENDING
                attempt = wanted.attempt if wanted else 1
                task.reason = f"waiting for artifact {request.digest} (request {attempt})"
        self._dirty = True

    def _pinned(self) -> set[str]:
        """Digests the store must keep: those of running tasks and of tasks still to run."""
        pinned = set()
        for task in self.tasks.values():
            if task.run is not None or (
                not task.removing and (task.spec.daemon or task.memory.finished is None)
            ):
                pinned.update(_artifacts(task.spec))
            if task.replacement is not None:
                pinned.update(_artifacts(task.replacement))
        return pinned

    def _fetch(self, task: Task, now: float) -> None:
        """Get a missing module: from its registry (direct pull) or over MQTT."""
        spec = task.spec
        if self.registry is None or spec.image is None:
            request = self.transfers.want(spec.digest, spec.image, now, spec.size)
            if request is not None:
                self._send_request(request)
            return
        pull = self.pulls.want(spec.digest, spec.image, spec.size or None, now)
        pull = pull or self.pulls.get(spec.digest)
        assert pull is not None
        # While a pull is retried, its tasks keep showing the last error, not "pulling".
        reason = pull.reason or f"pulling {spec.digest} from {pull.image}"
        state = TaskState.FAILED if pull.permanent else TaskState.PENDING
        if (task.state, task.reason) != (state, reason):
            task.state, task.reason = state, reason
            self._dirty = True

    def _fetch_inputs(self, task: Task, now: float) -> list[ArtifactRef]:
        """Start fetching the task's missing inputs over MQTT; returns those still missing."""
        missing = [ref for ref in task.spec.inputs or () if not self.store.has(ref.digest)]
        for ref in missing:
            request = self.transfers.want(ref.digest, None, now, ref.size)
            if request is not None:
                self._send_request(request)
        return missing

    def _show_input_wait(self, task: Task, ref: ArtifactRef) -> None:
        wanted = self.transfers.waiting(ref.digest)
        if wanted is not None and wanted.error is not None:
            reason = f"input {ref.name} unavailable: {wanted.error} (retrying)"
        else:
            attempt = wanted.attempt if wanted is not None else 1
            # Starts like a module's wait, so a reconciler sees the task still needs artifacts.
            reason = f"waiting for artifact {ref.digest} (input {ref.name}, request {attempt})"
        if (task.state, task.reason) != (TaskState.PENDING, reason):
            task.state, task.reason = TaskState.PENDING, reason
            self._dirty = True

    def _start_pull(self, pull: Pull) -> None:
        log.info("pulling %s from %s (attempt %d)", pull.digest, pull.image, pull.attempts)
        threading.Thread(
            target=self._pull,
            args=(pull.digest, pull.image, pull.size),
            name=f"pull-{pull.digest[7:19]}",
            daemon=True,  # a download in progress must not hold up the agent's exit
        ).start()

    def _pull(self, digest: str, image: str, size: int | None) -> None:
        """On a pull thread: download and verify, then hand the file to the agent thread."""
        assert self.registry is not None
        path: Path | None = None
        error: RegistryError | None = None
        try:
            path = self.registry.pull(image, digest, self.store.staging_dir(), max_bytes=size)
        except RegistryError as exc:
            error = exc
        except Exception as exc:  # the agent thread must hear back whatever happens
            log.exception("pull of %s from %s: unexpected failure", digest, image)
            error = RegistryError(f"pull of {digest} from {image} failed: {exc}")
        self._events.put(("pulled", digest, path, error))

    def _on_pulled(self, digest: str, path: Path | None, error: RegistryError | None) -> None:
        if path is not None:
            try:
                self.store.put_file(digest, path)
            except (DigestMismatch, OSError) as exc:  # pulled bytes were verified; disk faults
                error = RegistryError(f"pulled {digest} but could not store it: {exc}")
        pull = self.pulls.finished(digest, error, self.monotonic())
        if pull is None:
            return  # no task needs it any more; a stored module just waits in the cache
        if error is None:
            log.info("artifact %s pulled from %s", digest, pull.image)
            return  # the next _schedule starts the tasks
        log.warning("task module %s: %s", digest, pull.reason)
        state = TaskState.FAILED if pull.permanent else TaskState.PENDING
        for task in self._tasks_needing(digest):
            task.state, task.reason = state, pull.reason
        self._dirty = True

    # Running tasks.
    def _should_run(self, task: Task, now: float) -> bool:
        if task.run is not None or task.removing:
            return False
        if task.spec.daemon:
            return task.restart_at is None or now >= task.restart_at
        return task.memory.finished is None

    def _schedule(self) -> None:
        now = self.monotonic()
        running = sum(1 for t in self.tasks.values() if t.run is not None)
        for name in sorted(self.tasks):
            task = self.tasks[name]
            if not self._should_run(task, now):
                continue
            # The module and the inputs are fetched side by side.
            module_ready = self.store.has(task.spec.digest)
            if not module_ready:
                self._fetch(task, now)
            missing = self._fetch_inputs(task, now)
            if not module_ready:
                continue
            if missing:
                self._show_input_wait(task, missing[0])
                continue
            if running >= self.config.max_tasks:
                reason = f"waiting for a free slot ({self.config.max_tasks} tasks running)"
                if task.reason != reason:
                    task.state, task.reason = TaskState.PENDING, reason
                    self._dirty = True
                continue
            # A run is a use: least recently run goes first.
            for digest in _artifacts(task.spec):
                self.store.touch(digest)
            self._start(task)
            running += 1
        for pull in self.pulls.due(now):
            self._start_pull(pull)

    def _start(self, task: Task) -> None:
        self._run_ids += 1
        memory = task.memory
        memory.runs += 1
        memory.in_progress = True
        memory.started_at = self.clock()
        memory.finished_at = None
        run = Run(self._run_ids, memory.runs, memory.started_at)
        task.run = run
        task.restart_at = None
        task.state = TaskState.RUNNING
        task.reason = None
        self._journal_dirty = True
        self._dirty = True
        self._workers.submit(self._work, task.spec, run)

    def _work(self, spec: DesiredTask, run: Run) -> None:
        outputs: list[ArtifactRef] | None = None  # set once a completed run's are uploaded
        workspace: files.Workspace | None = None
        try:
            if spec.inputs or spec.outputs is not None:
                workspace = files.stage(
                    self.config.runs_dir,
                    f"{spec.name}.{run.id}",
                    [(ref.name, self.store.path(ref.digest)) for ref in spec.inputs or ()],
                    outputs=spec.outputs is not None,
                )
            outcome = self._execute(spec, run, workspace)
            if (
                outcome.status == "completed"
                and spec.outputs is not None
                and workspace is not None
                and workspace.outputs is not None
            ):
                outcome, outputs = self._upload_outputs(spec, run, workspace.outputs, outcome)
        except (ModuleError, files.FilesError) as exc:
            outcome = Outcome(status="failed", error=str(exc))
        except Exception as exc:
            log.exception("task %s: unexpected failure", spec.name)
            outcome = Outcome(status="failed", error=f"internal error: {exc}")
        finally:
            if workspace is not None:
                workspace.remove()
        # Published from here, not from the agent thread: a short task's result goes out
        # without waiting for a thread hop. The agent learns of it through the queue.
        # Its uploads were handed to the session first, so they reach the broker before it.
        result = TaskResult(
            proplet=self.config.proplet_id,
            task=spec.name,
            spec_hash=spec.spec_hash,
            state=_TERMINAL[outcome.status],
            runs=max(1, run.number),
            started_at=run.started_at,
            finished_at=max(run.started_at, self.clock()),
            exit_code=outcome.exit_code,
            result=list(outcome.result) if outcome.result is not None else None,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            truncated=outcome.truncated,
            error=outcome.error[:4096] if outcome.error else None,
            outputs=outputs,
        )
        self.session.publish(self.ns.result(self.config.proplet_id, spec.name), result.encode(),
                             retain=True)  # fmt: skip
        self._events.put(("finished", spec.name, run.id, outcome, result))

    def _execute(self, spec: DesiredTask, run: Run, workspace: files.Workspace | None) -> Outcome:
        metered = spec.fuel is not None
        prepared = self.runtime.cached(spec.digest, metered=metered)
        if prepared is None:
            wasm = self.store.read(spec.digest)
            if wasm is None:
                raise ModuleError(f"artifact {spec.digest} vanished from the cache")
            prepared = self.runtime.prepare(spec.digest, wasm, metered=metered)
        guest = self.config.guest_data_dir
        execution = self.runtime.execution(
            prepared,
            Invocation(
                function=spec.function,
                args=tuple(spec.args),
                env=dict(spec.env),
                stdin=spec.stdin,
                data_dir=guest if guest.is_dir() else None,
                inputs_dir=workspace.inputs if workspace is not None else None,
                outputs_dir=workspace.outputs if workspace is not None else None,
                name=spec.name,
            ),
            Limits(
                memory=spec.memory,
                timeout_ms=spec.timeout_ms,
                fuel=spec.fuel,
                output_bytes=self.config.output_bytes,
            ),
        )
        if not run.attach(execution):
            return Outcome(status="stopped", error="stopped before it started")
        return execution.run()

    def _upload_outputs(
        self, spec: DesiredTask, run: Run, directory: Path, outcome: Outcome
    ) -> tuple[Outcome, list[ArtifactRef] | None]:
        """Collect and upload what a completed run wrote under /out; a fault fails the run."""
        assert spec.outputs is not None
        started = time.monotonic()
        try:
            written = files.collect(directory, spec.outputs)
            for file in written:
                files.upload(
                    file,
                    self.ns,
                    self.config.proplet_id,
                    self.session.publish,
                    stopped=lambda: run.stop_requested,
                )
        except files.FilesError as exc:
            status: Status = "stopped" if run.stop_requested else "failed"
            return replace(outcome, status=status, error=str(exc)), None
        except OSError as exc:
            error = f"outputs: cannot read them: {exc}"
            return replace(outcome, status="failed", error=error), None
        if written:
            log.info(
                "task %s: uploaded %d output(s), %d bytes, in %.1f ms",
                spec.name,
                len(written),
                sum(f.size for f in written),
                (time.monotonic() - started) * 1e3,
            )
        return outcome, [file.ref() for file in written]

    def _on_finished(self, name: str, run_id: int, outcome: Outcome, result: TaskResult) -> None:
        task = self.tasks.get(name)
        if task is None or task.run is None or task.run.id != run_id:
            return
        task.run = None
        memory = task.memory
        memory.in_progress = False
        memory.finished_at = result.finished_at
        memory.exit_code = outcome.exit_code
        memory.result = _summary(outcome)
        memory.reason = outcome.error
        state = result.state
        if task.removing:
            self._forget(task)
            self._journal_dirty = True
            return
        if task.replacement is not None:
            self._reset(task, task.replacement)
            self._journal_dirty = True
            return
        task.last_result = result
        task.state = state
        task.reason = outcome.error
        if task.spec.daemon:
            ran_for = memory.finished_at - (memory.started_at or memory.finished_at)
            task.failures_in_row = 0 if ran_for >= DAEMON_HEALTHY_RUN else task.failures_in_row + 1
            delay = min(
                DAEMON_BACKOFF_MAX, DAEMON_BACKOFF_INITIAL * 2 ** max(0, task.failures_in_row - 1)
            )
            task.restart_at = self.monotonic() + delay
            memory.restarts += 1
            task.reason = f"{outcome.error or 'exited'}; restarting in {delay:.0f}s"
        else:
            memory.finished = state.value
        self._journal_dirty = True
        self._dirty = True

    # Restore and report.
    def _restore(self) -> None:
        self.memory = self.journal.load()
        desired = self.memory.desired
        if desired is None:
            return
        kept: dict[str, TaskMemory] = {}
        for spec in desired.tasks:
            memory = self.memory.tasks.get(spec.name)
            if memory is None or memory.spec_hash != spec.spec_hash:
                memory = TaskMemory(spec_hash=spec.spec_hash)
            task = Task(spec=spec, memory=memory)
            if memory.in_progress:
                memory.in_progress = False
                memory.restarts += 1
                task.reason = "interrupted by an agent restart; running again"
            elif memory.finished is not None and not spec.daemon:
                task.state = TaskState(memory.finished)
                task.reason = memory.reason
            kept[spec.name] = memory
            self.tasks[spec.name] = task
        self.memory.tasks = kept
        self._journal_dirty = True
        log.info(
            "restored desired set generation %d (%d tasks)", desired.generation, len(self.tasks)
        )

    def _on_connected(self) -> None:
        pid = self.config.proplet_id
        self.session.publish(
            self.ns.presence(pid), Presence(proplet=pid, online=True).encode(), retain=True
        )
        announce = Announce(
            proplet=pid,
            runtime=RuntimeKind.WASMTIME,
            labels=self.config.labels,
            max_tasks=self.config.max_tasks,
            heartbeat_s=self.config.heartbeat_s,
            version=__version__,
        )
        self.session.publish(self.ns.announce(pid), announce.encode())
        # Retained messages may have been lost with a broker restart: publish ours again.
        for task in self.tasks.values():
            if task.last_result is not None:
                self.session.publish(
                    self.ns.result(pid, task.spec.name), task.last_result.encode(), retain=True
                )
        for request in self.transfers.resend(self.monotonic()):
            self._send_request(request)
        self._publish_state()
        self._heartbeat()

    def reported_state(self) -> ReportedState:
        desired = self.memory.desired
        return ReportedState(
            proplet=self.config.proplet_id,
            runtime=RuntimeKind.WASMTIME,
            labels=self.config.labels,
            max_tasks=self.config.max_tasks,
            observed_generation=desired.generation if desired else 0,
            ts=self.clock(),
            version=__version__,
            tasks=[
                TaskStatus(
                    name=t.spec.name,
                    spec_hash=t.spec.spec_hash,
                    owner=t.spec.owner,
                    state=t.state,
                    restarts=t.memory.restarts,
                    runs=t.memory.runs,
                    started_at=t.memory.started_at,
                    finished_at=t.memory.finished_at,
                    exit_code=t.memory.exit_code,
                    result=t.memory.result,
                    reason=t.reason[:512] if t.reason else None,
                )
                for t in sorted(self.tasks.values(), key=lambda t: t.spec.name)
                if not t.removing
            ],
        )

    def _save_journal(self) -> None:
        """One snapshot per loop turn, however many tasks changed in it."""
        if self._journal_dirty:
            self._journal_dirty = False
            self.journal.save(self.memory)

    def _publish_state(self) -> None:
        self._dirty = False
        self._state_due = None
        # Report only what the journal holds: a run reported Running and then cut short by a
        # crash must be found in the journal at the next start, or it would not count.
        self.journal.flush(timeout=1.0)
        if self.session.connected:
            self.session.publish(
                self.ns.state(self.config.proplet_id), self.reported_state().encode(), retain=True
            )

    def _heartbeat(self) -> None:
        self._heartbeat_seq += 1
        desired = self.memory.desired
        beat = Heartbeat(
            proplet=self.config.proplet_id,
            seq=self._heartbeat_seq,
            ts=self.clock(),
            interval_s=self.config.heartbeat_s,
            running=sum(1 for t in self.tasks.values() if t.run is not None),
            observed_generation=desired.generation if desired else 0,
        )
        if self.session.connected:
            self.session.publish(self.ns.heartbeat(self.config.proplet_id), beat.encode(), qos=0)


_TERMINAL: dict[str, TerminalState] = {
    "completed": TaskState.COMPLETED,
    "failed": TaskState.FAILED,
    "stopped": TaskState.STOPPED,
}


def _summary(outcome: Outcome) -> str | None:
    if outcome.result is not None:
        text = ",".join(outcome.result)
    elif outcome.stdout:
        text = outcome.stdout.strip().splitlines()[-1] if outcome.stdout.strip() else ""
    else:
        return None
    return text[:SUMMARY_CHARS]


def _artifacts(spec: DesiredTask) -> list[str]:
    """Digests a task needs before it can run: its module, then its inputs."""
    return [spec.digest, *(ref.digest for ref in spec.inputs or ())]
