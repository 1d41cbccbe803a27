"""The coordinator of federated jobs: it owns each job's rounds, its checkpoints and its status.

It never publishes a desired set. Each pass asks it (``step``) for the tasks of the rounds in
progress, and the pass places them beside the Git tasks and publishes the sets, so every set has
one writer. A round's task is the job's trainer, pinned to the clients selected for the round,
with the global model as an input (served by the pass's artifact server through ``lookup``) and
``/out`` for the local model, which comes back as an upload.

Between passes, messages only wake it: a task result or a finished upload calls ``wake``, and
the next ``step`` reads what arrived. A round closes when ``min`` valid updates arrived and every
selected client answered (or has gone), or when ``roundTimeout`` passed with ``min`` of them; with
fewer, the round runs again with a new selection until ``waitTimeout``. Each closed round is
checkpointed in the state directory (the model and ``state.json``, written atomically), so a
restarted coordinator resumes at the round after the last checkpoint: it runs the interrupted
round again, with the same selection and seeds, so the final model is the one an uninterrupted
run computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from reconciler.broker import Broker, FleetUnreachable
from reconciler.desired import DesiredState, ResolvedJob, ResolvedTask, wire_task
from reconciler.evaluate import Evaluator
from reconciler.federated import (
    MODEL_FILE,
    NPY_HEADER_ALLOWANCE,
    UPDATE_FILE,
    Model,
    ModelError,
    Report,
    Updates,
    check_update,
    from_bytes,
    hyperparam_env,
    initial_model,
    parse_report,
    select_clients,
    to_bytes,
    trainer_env,
    weighted_mean,
)
from reconciler.observed import ObservedState
from reconciler.placement import Requirement
from reconciler.uploads import Uploads
from schemas.manifests import MAX_MODEL_PARAMETERS
from schemas.messages import (
    ArtifactRef,
    DecodeError,
    JobPhase,
    JobStatus,
    RoundRecord,
    TaskResult,
    TaskState,
    decode,
    sha256_digest,
)
from schemas.topics import Namespace, TopicError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
STATUS_HISTORY = 100
# A job whose status another machine's coordinator refreshed this recently is left to it; a
# driving coordinator refreshes its statuses well within that time.
LEASE_SECONDS = 30.0
REFRESH_SECONDS = 10.0
# Annotations of a pushed final model (beside org.opencontainers.image.created).
ANNOTATION_JOB = "dev.propeller.job"
ANNOTATION_ROUNDS = "dev.propeller.rounds"
ANNOTATION_ACCURACY = "dev.propeller.accuracy"
ANNOTATION_MODEL_DIGEST = "dev.propeller.model.digest"
TERMINAL = (JobPhase.COMPLETED, JobPhase.FAILED)


def _quiet(_line: str) -> None:
    return None


@dataclass(slots=True)
class Checkpoint:
    """What survives a restart: written after every round, read when a job is picked up."""

    spec_hash: str
    phase: JobPhase
    completed: int  # rounds done
    attempt: int  # runs of the round after ``completed``; a new one each time it starts
    model: str  # digest of the global model after ``completed`` rounds
    started_at: float
    history: list[RoundRecord] = field(default_factory=list)
    reason: str | None = None
    revision: str | None = None

    def to_json(self) -> bytes:
        data = {
            **asdict(self),
            "phase": self.phase.value,
            "history": [record.model_dump(mode="json") for record in self.history],
        }
        return json.dumps(data, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        raw = json.loads(data)
        return cls(
            spec_hash=str(raw["spec_hash"]),
            phase=JobPhase(raw["phase"]),
            completed=int(raw["completed"]),
            attempt=int(raw["attempt"]),
            model=str(raw["model"]),
            started_at=float(raw["started_at"]),
            history=[RoundRecord.model_validate(r) for r in raw.get("history", [])],
            reason=raw.get("reason"),
            revision=raw.get("revision"),
        )


@dataclass(slots=True)
class Round:
    """The round in progress (memory only: a restart runs it again)."""

    number: int
    selected: tuple[str, ...]
    started: float
    deadline: float
    updates: Updates
    task: ResolvedTask
    spec_hash: str
    reports: dict[str, Report] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    training: dict[str, float] = field(default_factory=dict)
    pending: dict[str, tuple[TaskResult, str]] = field(default_factory=dict)  # waits for upload

    @property
    def answered(self) -> set[str]:
        return set(self.reports) | set(self.rejected) | self.gone


class JobRun:
    """One job's state: the checkpoint, the global model, and the round in progress."""

    def __init__(
        self, job: ResolvedJob, directory: Path, read: Callable[[str], bytes | None], now: float
    ) -> None:
        self.job = job
        self.directory = directory
        self.read = read
        self.models: dict[str, bytes] = {}
        self._array: tuple[str, Model] | None = None  # the global model decoded, by digest
        self.round: Round | None = None
        self.waiting_since: float | None = None
        self.evaluator: Evaluator | None = None
        self.checkpoint = self._load(now)

    # -- state on disk --------------------------------------------------------------------------

    def _load(self, now: float) -> Checkpoint:
        path = self.directory / "state.json"
        if path.exists():
            try:
                saved = Checkpoint.from_json(path.read_bytes())
            except (ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "job %s: unreadable checkpoint %s (%s); starting over", self.name, path, exc
                )
            else:
                model = self._read_model(saved.model)
                if saved.spec_hash == self.job.spec_hash and model is not None:
                    self.models[saved.model] = model
                    return saved
                if saved.spec_hash != self.job.spec_hash:
                    log.info("job %s: the spec changed; starting again from round 1", self.name)
        spec = self.job.spec
        model_bytes = to_bytes(initial_model(spec.model, spec.seed, self.read))
        checkpoint = Checkpoint(
            spec_hash=self.job.spec_hash,
            phase=JobPhase.RUNNING,
            completed=0,
            attempt=0,
            model=sha256_digest(model_bytes),
            started_at=now,
        )
        self.models[checkpoint.model] = model_bytes
        self._save(checkpoint, model_bytes)
        return checkpoint

    def _read_model(self, digest: str) -> bytes | None:
        path = self.directory / "models" / f"{digest.removeprefix('sha256:')}.npy"
        try:
            data = path.read_bytes()
        except OSError:
            return None
        return data if sha256_digest(data) == digest else None

    def _save(self, checkpoint: Checkpoint, model: bytes | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if model is not None:
            models = self.directory / "models"
            models.mkdir(exist_ok=True)
            _write_atomic(models / f"{sha256_digest(model).removeprefix('sha256:')}.npy", model)
        _write_atomic(self.directory / "state.json", checkpoint.to_json())

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def terminal(self) -> bool:
        return self.checkpoint.phase in TERMINAL

    @property
    def model_bytes(self) -> bytes:
        return self.models[self.checkpoint.model]

    @property
    def model(self) -> Model:
        """The global model as an array, decoded once per model."""
        digest = self.checkpoint.model
        if self._array is None or self._array[0] != digest:
            self._array = (digest, from_bytes(self.model_bytes))
        return self._array[1]

    def final_model_path(self) -> Path:
        return self.directory / "final.npy"

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
            self.evaluator = None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Coordinator:
    """Drives every FederatedJob of the desired state, round by round."""

    def __init__(
        self,
        broker: Broker,
        namespace: Namespace,
        state_dir: Path,
        *,
        name: str,
        owner: str,
        progress: Progress = _quiet,
        wake: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        modules: Callable[[str], bytes | None] | None = None,
        insecure_registry: bool = False,
    ) -> None:
        self.broker = broker
        self.modules = modules  # trainer modules from a registry, for evaluation
        self.insecure_registry = insecure_registry  # plain HTTP for spec.output pushes
        self.ns = namespace
        self.state_dir = state_dir
        self.name = name
        self.owner = owner
        self.progress = progress
        self.clock = clock
        self._wake = wake
        self._results: queue.SimpleQueue[TaskResult] = queue.SimpleQueue()
        self._event = threading.Event()
        self.runs: dict[str, JobRun] = {}
        # One update at most the largest model a manifest may ask for; a few of them at once.
        self.uploads = Uploads(
            namespace,
            max_bytes=4 * (MAX_MODEL_PARAMETERS * 4 + NPY_HEADER_ALLOWANCE),
            max_upload_bytes=MAX_MODEL_PARAMETERS * 4 + NPY_HEADER_ALLOWANCE,
            on_complete=self._upload_done,
        )
        self._lock = threading.Lock()
        self._published: dict[str, tuple[tuple[object, ...], float]] = {}
        self._seen: dict[str, JobStatus] = {}  # the statuses on the broker, by job
        self._elsewhere: dict[str, str] = {}  # jobs another machine drives, and which

    def attach(self) -> None:
        self.uploads.attach(self.broker)
        self.broker.subscribe(self.ns.fleet_results(), self._on_result, qos=1)
        self.broker.subscribe(self.ns.jobs(), self._on_status, qos=0)

    def _on_status(self, topic: str, payload: bytes, _retained: bool) -> None:
        if not payload:
            return
        try:
            status = decode(JobStatus, payload)
        except DecodeError as exc:
            log.warning("dropped job status on %s: %s", topic, exc)
            return
        with self._lock:
            self._seen[status.job] = status

    # -- network thread: hand over only -------------------------------------------------------

    def _on_result(self, topic: str, payload: bytes, _retained: bool) -> None:
        if not payload:
            return
        try:
            parsed = self.ns.parse(topic)
            result = decode(TaskResult, payload)
        except (TopicError, DecodeError) as exc:
            log.warning("dropped result on %s: %s", topic, exc)
            return
        if result.task in self.runs and result.proplet == parsed.proplet:
            self._results.put(result)
            self._signal(f"result of {result.task} from {result.proplet}")

    def _upload_done(self, proplet: str, digest: str) -> None:
        self._signal(f"upload {digest[7:19]} from {proplet}")

    def _signal(self, reason: str) -> None:
        self._event.set()
        if self._wake is not None:
            self._wake(reason)

    def wait(self, timeout: float) -> bool:
        """Block until a result or upload arrives, or ``timeout``; True when woken."""
        woken = self._event.wait(max(0.0, timeout))
        self._event.clear()
        return woken

    # -- the pass's side ----------------------------------------------------------------------

    def lookup(self, digest: str) -> bytes | None:
        """A model by digest, for the artifact server."""
        with self._lock:
            for run in self.runs.values():
                if digest in run.models:
                    return run.models[digest]
        return None

    @property
    def active(self) -> bool:
        return any(not run.terminal for run in self.runs.values())

    def next_deadline(self) -> float | None:
        """When a round times out or a wait gives up, whichever is first (wall clock)."""
        times: list[float] = []
        for run in self.runs.values():
            if run.round is not None:
                times.append(run.round.deadline)
            elif run.waiting_since is not None:
                times.append(run.waiting_since + run.job.spec.wait_timeout / 1000)
        return min(times) if times else None

    def set_jobs(self, desired: DesiredState, read: Callable[[str], bytes | None]) -> None:
        """Pick up the jobs of a revision: new ones start or resume, changed ones start over."""
        now = self.clock()
        wanted = {job.name: job for job in desired.jobs}
        with self._lock:
            for name in list(self.runs):
                if name not in wanted or self.runs[name].job.spec_hash != wanted[name].spec_hash:
                    self.runs.pop(name).close()
            for name, job in wanted.items():
                if name not in self.runs:
                    directory = self.state_dir / "jobs" / name
                    try:
                        run = JobRun(job, directory, read, now)
                    except ModelError as exc:
                        log.error("job %s: %s", name, exc)
                        continue
                    run.checkpoint.revision = desired.revision
                    self.runs[name] = run
                    done = run.checkpoint.completed
                    if run.terminal:
                        phase = run.checkpoint.phase.value.lower()
                        self.progress(f"job {name}: {phase} after {done} round(s)")
                    elif done:
                        self.progress(f"job {name}: resuming after round {done}/{job.spec.rounds}")
                    else:
                        self.progress(f"job {name}: starting, {job.spec.rounds} round(s)")
                else:
                    self.runs[name].read = read

    def step(self, observed: ObservedState) -> tuple[list[ResolvedTask], dict[str, str]]:
        """Advance every job as far as the messages that arrived allow.

        Returns the tasks of the rounds in progress and the names of job tasks to remove, for
        the pass to place and publish.
        """
        self._drain()
        tasks: list[ResolvedTask] = []
        retired: dict[str, str] = {}
        for run in list(self.runs.values()):
            if self._driven_elsewhere(run):
                continue  # its tasks stay as they are: the plan leaves a job's tasks alone
            self._advance(run, observed)
            if run.round is not None:
                tasks.append(run.round.task)
            else:
                retired[run.name] = (
                    f"federated job {run.checkpoint.phase.value.lower()}"
                    if run.terminal
                    else "federated job waiting for clients"
                )
        self.publish_statuses()
        return tasks, retired

    def close(self) -> None:
        for run in self.runs.values():
            run.close()

    # -- rounds -------------------------------------------------------------------------------

    def _drain(self) -> None:
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return
            run = self.runs.get(result.task)
            if run is None or run.round is None or result.spec_hash != run.round.spec_hash:
                continue  # a late result of a round that closed, or of another attempt
            current = run.round
            if result.proplet not in current.selected or result.proplet in current.answered:
                continue
            self._take(run, current, result)

    def _take(self, run: JobRun, current: Round, result: TaskResult) -> None:
        proplet = result.proplet
        if result.state != TaskState.COMPLETED:
            reason = result.error or f"trainer {result.state.value.lower()}"
            said = result.stderr.strip().splitlines()
            if said:
                reason += f": {said[-1][:200]}"
            current.rejected[proplet] = f"trainer failed: {reason}"[:500]
            self.progress(f"job {run.name} round {current.number}: {proplet} rejected: {reason}")
            return
        update = next((ref for ref in result.outputs or [] if ref.name == UPDATE_FILE), None)
        if update is None:
            current.rejected[proplet] = f"the trainer wrote no /out/{UPDATE_FILE}"
            return
        current.training[proplet] = max(0.0, result.finished_at - result.started_at)
        current.pending[proplet] = (result, update.digest)
        self._collect(run, current)

    def _collect(self, run: JobRun, current: Round) -> None:
        """Validate the updates whose bytes have arrived."""
        for proplet, (result, digest) in list(current.pending.items()):
            data = self.uploads.get(proplet, digest)
            if data is None:
                continue
            del current.pending[proplet]
            self.uploads.discard(proplet, digest)
            try:
                report = parse_report(result.stdout)
                model = check_update(run.model, data, run.job.spec.update_bounds.max_norm)
            except ModelError as exc:
                current.rejected[proplet] = f"update refused: {exc}"
                self.progress(f"job {run.name} round {current.number}: {proplet} rejected: {exc}")
                continue
            current.reports[proplet] = report
            slot = current.selected.index(proplet)
            current.updates.add(proplet, model, float(report.samples), slot)

    def _advance(self, run: JobRun, observed: ObservedState) -> None:
        spec = run.job.spec
        for _ in range(spec.rounds + 1):  # a round may close and the next start in one step
            if run.terminal:
                run.round = None
                return
            now = self.clock()
            current = run.round
            if current is None:
                if not self._start_round(run, observed, now):
                    return
                continue
            if current.pending:
                self._collect(run, current)
            alive = {p for p, entry in observed.proplets.items() if entry.alive}
            for proplet in current.selected:
                if proplet not in alive and proplet not in current.answered:
                    current.gone.add(proplet)
            valid = len(current.reports)
            everyone = current.answered >= set(current.selected) and not current.pending
            if valid >= spec.clients.min and (everyone or now >= current.deadline):
                self._close_round(run, current, now)
                continue
            if now >= current.deadline or (everyone and valid < spec.clients.min):
                self._retry_round(run, current, now, valid)
            return

    def _candidates(self, need: Requirement, observed: ObservedState) -> list[str]:
        return sorted(
            p.id
            for p in observed.proplets.values()
            if p.alive
            and not p.lost
            and p.runtime is not None
            and need.matches(p.runtime, p.labels)
        )

    def _start_round(self, run: JobRun, observed: ObservedState, now: float) -> bool:
        spec = run.job.spec
        need = Requirement.of(spec.clients.runtime, spec.clients.selector, None)
        candidates = self._candidates(need, observed)
        if len(candidates) < spec.clients.min:
            if run.waiting_since is None:
                run.waiting_since = now
            waited = now - run.waiting_since
            reason = (
                f"{spec.clients.min} live client(s) matching {need.describe()},"
                f" {len(candidates)} alive"
            )
            if waited >= spec.wait_timeout / 1000:
                self._finish(
                    run, JobPhase.FAILED, f"gave up after {waited:.0f}s waiting for {reason}"
                )
            elif run.checkpoint.reason != f"waiting for {reason}":
                run.checkpoint.reason = f"waiting for {reason}"
                run.checkpoint.phase = JobPhase.WAITING
                self.progress(
                    f"job {run.name}: waiting for {reason}"
                    f" (gives up after {spec.wait_timeout / 1000:g}s)"
                )
            return False
        run.waiting_since = None
        number = run.checkpoint.completed + 1
        run.checkpoint.attempt += 1
        run.checkpoint.phase = JobPhase.RUNNING
        run.checkpoint.reason = None
        run._save(run.checkpoint)
        selected = select_clients(
            candidates, spec.clients.fraction, spec.clients.min, spec.seed, number
        )
        model = run.model_bytes
        env = trainer_env(spec, run.name, number, run.checkpoint.attempt)
        trainer = run.job.trainer
        task = replace(
            trainer,
            spec=trainer.spec.model_copy(update={"env": env}),
            inputs=(ArtifactRef(name=MODEL_FILE, digest=run.checkpoint.model, size=len(model)),),
            outputs=len(model) + NPY_HEADER_ALLOWANCE,
            among=frozenset(selected),
        )
        run.round = Round(
            number=number,
            selected=selected,
            started=now,
            deadline=now + spec.round_timeout / 1000,
            updates=Updates(len(selected), run.model.shape),
            task=task,
            spec_hash=wire_task(task, self.owner).spec_hash if task.resolved else "",
        )
        self.progress(
            f"job {run.name} round {number}/{spec.rounds}: {len(selected)} client(s)"
            + (f" (attempt {run.checkpoint.attempt})" if run.checkpoint.attempt > 1 else "")
        )
        return True

    def _retry_round(self, run: JobRun, current: Round, now: float, valid: int) -> None:
        spec = run.job.spec
        if run.waiting_since is None:
            run.waiting_since = current.started
        missing = sorted(set(current.selected) - set(current.reports))
        why = (
            f"round {current.number}: {valid} valid update(s) of {spec.clients.min} needed"
            f" (no update from {', '.join(missing)})"
        )
        if now - run.waiting_since >= spec.wait_timeout / 1000:
            self._finish(run, JobPhase.FAILED, f"gave up: {why}")
            return
        self.progress(f"job {run.name} {why}; running it again")
        run.checkpoint.reason = why
        run.round = None

    def _close_round(self, run: JobRun, current: Round, now: float) -> None:
        spec = run.job.spec
        new = current.updates.aggregate(spec.aggregation.method, spec.aggregation.trim)
        model = to_bytes(new)
        digest = sha256_digest(model)
        samples = {p: float(r.samples) for p, r in current.reports.items()}
        losses = {p: r.loss for p, r in current.reports.items() if r.loss is not None}
        evaluation = self._evaluate(run, model)
        record = RoundRecord(
            round=current.number,
            selected=list(current.selected),
            participants=sorted(current.reports),
            rejected=dict(sorted(current.rejected.items())),
            missing=sorted(set(current.selected) - set(current.reports) - set(current.rejected)),
            samples=int(sum(samples.values())),
            train_loss=weighted_mean(losses, samples),
            loss=evaluation.loss if evaluation is not None else None,
            accuracy=evaluation.accuracy if evaluation is not None else None,
            seconds=round(now - current.started, 6),
            training_seconds=round(max(current.training.values(), default=0.0), 6),
            model=digest,
        )
        with self._lock:
            run.models = {digest: model}
        run.checkpoint.history.append(record)
        run.checkpoint.completed = current.number
        run.checkpoint.model = digest
        run.checkpoint.attempt = 0
        run.checkpoint.reason = None
        run.round = None
        run._save(run.checkpoint, model)
        shown = f"job {run.name} round {current.number}/{spec.rounds}: {len(current.reports)}"
        shown += f"/{len(current.selected)} update(s)"
        if current.rejected:
            shown += f", {len(current.rejected)} rejected"
        if record.train_loss is not None:
            shown += f", train loss {record.train_loss:.4f}"
        if evaluation is not None and evaluation.accuracy is not None:
            shown += f", accuracy {evaluation.accuracy:.4f}"
        shown += f" ({record.seconds:.2f}s)"
        self.progress(shown)
        target = spec.target
        if target is not None and evaluation is not None:
            value = evaluation.accuracy if target.metric == "accuracy" else evaluation.loss
            if value is not None and (
                value >= target.value if target.metric == "accuracy" else value <= target.value
            ):
                self._finish(
                    run,
                    JobPhase.COMPLETED,
                    f"target {target.metric} {target.value:g} reached in round {current.number}",
                )
                return
        if current.number >= spec.rounds:
            self._finish(run, JobPhase.COMPLETED, None)

    def _evaluate(self, run: JobRun, model: bytes) -> Report | None:
        evaluation = run.job.spec.evaluation
        if evaluation is None:
            return None
        try:
            if run.evaluator is None:
                wasm = self._trainer_wasm(run)
                data = {}
                for name in evaluation.files:
                    content = run.read(f"{evaluation.data}/{name}")
                    if content is None:
                        raise ModelError(f"{evaluation.data}/{name} is missing")
                    data[name] = content
                run.evaluator = Evaluator(
                    wasm,
                    data,
                    hyperparam_env(run.job.spec),
                    memory=evaluation.limits.memory,
                    fuel=evaluation.limits.fuel,
                )
            return run.evaluator.evaluate(model)
        except ModelError as exc:
            log.warning("job %s: evaluation failed: %s", run.name, exc)
            self.progress(f"job {run.name}: evaluation failed: {exc}")
            return None

    def _trainer_wasm(self, run: JobRun) -> bytes:
        trainer = run.job.trainer
        if trainer.spec.module.file is not None:
            wasm = run.read(trainer.spec.module.file)
        else:
            wasm = (
                self.modules(trainer.digest)
                if self.modules is not None and trainer.digest is not None
                else None
            )
        if wasm is None:
            raise ModelError("the trainer module is not available to evaluate with")
        return wasm

    def _finish(self, run: JobRun, phase: JobPhase, reason: str | None) -> None:
        run.checkpoint.phase = phase
        run.checkpoint.reason = reason
        run.round = None
        run._save(run.checkpoint)
        if phase == JobPhase.COMPLETED:
            _write_atomic(run.final_model_path(), run.model_bytes)
            self.progress(
                f"job {run.name}: completed after {run.checkpoint.completed} round(s)"
                + (f" ({reason})" if reason else "")
                + f"; final model {run.final_model_path()}"
            )
            output = run.job.spec.output
            if output is not None:
                failure = self._push_final(run, output.image)
                if failure is not None:
                    # The job still completed; its status says the push did not happen.
                    failed = f"final model not pushed: {failure[:1000]}"
                    log.warning("job %s: %s", run.name, failed)
                    self.progress(f"job {run.name}: {failed}")
                    run.checkpoint.reason = f"{reason}; {failed}" if reason else failed
                    run._save(run.checkpoint)
        else:
            self.progress(f"job {run.name}: failed: {reason}")

    def _push_final(self, run: JobRun, image: str) -> str | None:
        """Push the final model to ``image``; the reason when it failed, else None."""
        from reconciler.registry import RegistryClient, RegistryError  # oras only when needed

        model = run.model_bytes
        annotations = {
            ANNOTATION_JOB: run.name,
            ANNOTATION_ROUNDS: str(run.checkpoint.completed),
            ANNOTATION_MODEL_DIGEST: run.checkpoint.model,
        }
        last = run.checkpoint.history[-1] if run.checkpoint.history else None
        if last is not None and last.accuracy is not None:
            annotations[ANNOTATION_ACCURACY] = str(last.accuracy)
        try:
            with RegistryClient.from_env(insecure=self.insecure_registry) as client:
                pushed = client.push_model(model, image, annotations, file_name=f"{run.name}.npy")
        except (RegistryError, ValueError, OSError) as exc:
            return str(exc) or type(exc).__name__
        self.progress(f"job {run.name}: pushed final model to {image} as {pushed.manifest_digest}")
        return None

    # -- status ---------------------------------------------------------------------------------

    def status(self, run: JobRun) -> JobStatus:
        checkpoint = run.checkpoint
        current = run.round
        return JobStatus(
            job=run.name,
            coordinator=self.name,
            revision=checkpoint.revision,
            spec_hash=checkpoint.spec_hash,
            phase=checkpoint.phase,
            round=current.number if current is not None else checkpoint.completed,
            rounds=run.job.spec.rounds,
            reason=checkpoint.reason,
            model=checkpoint.model,
            history=checkpoint.history[-STATUS_HISTORY:],
            started_at=checkpoint.started_at,
            updated_at=self.clock(),
        )

    def publish_statuses(self) -> None:
        """Publish each changed status, and each unchanged one every ``REFRESH_SECONDS``."""
        now = self.clock()
        for run in self.runs.values():
            if run.name in self._elsewhere:
                continue
            checkpoint = run.checkpoint
            # Everything a status shows but its timestamp; the history only ever grows.
            key = (
                checkpoint.phase,
                run.round.number if run.round is not None else None,
                len(checkpoint.history),
                checkpoint.reason,
                checkpoint.model,
                checkpoint.revision,
            )
            sent = self._published.get(run.name)
            if sent is not None and sent[0] == key and now - sent[1] < REFRESH_SECONDS:
                continue
            self._published[run.name] = (key, now)
            self.broker.publish(
                self.ns.job_status(run.name), self.status(run).encode(), qos=1, retain=True
            )

    def _driven_elsewhere(self, run: JobRun) -> bool:
        with self._lock:
            seen = self._seen.get(run.name)
        other = driven_elsewhere(seen, self.name, self.clock(), LEASE_SECONDS)
        if other != self._elsewhere.get(run.name):
            if other is None:
                self._elsewhere.pop(run.name, None)
                self.progress(f"job {run.name}: its other coordinator went quiet; taking over")
            else:
                self._elsewhere[run.name] = other
                self.progress(f"job {run.name}: driven by {other}; leaving it alone")
        return other is not None


@contextlib.contextmanager
def coordinating(
    broker: Broker,
    namespace: Namespace,
    state_dir: Path,
    **kwargs: Any,
) -> Iterator[Coordinator]:
    coordinator = Coordinator(broker, namespace, state_dir, **kwargs)
    coordinator.attach()
    try:
        yield coordinator
    finally:
        coordinator.close()


def with_jobs(
    desired: DesiredState, tasks: list[ResolvedTask], retired: Mapping[str, str]
) -> DesiredState:
    """``desired`` plus the tasks of the rounds in progress and the job tasks to remove."""
    if not tasks and not retired:
        return desired
    return replace(
        desired,
        tasks=tuple(sorted([*desired.tasks, *tasks], key=lambda t: t.manifest_name)),
        retired={**desired.retired, **retired},
    )


def read_jobs(broker: Broker, timeout: float = 5.0) -> list[JobStatus]:
    """The retained status of every federated job in the broker's namespace, by name."""
    ns = broker.settings.namespace
    found: dict[str, bytes] = {}
    done = threading.Event()
    marker = f"{ns.root}/observers/{broker.client_id}"

    def keep(topic: str, payload: bytes, _retained: bool) -> None:
        found[topic] = payload

    broker.subscribe(marker, lambda _t, _p, _r: done.set())
    broker.subscribe(ns.jobs(), keep)
    broker.publish(marker, b"end", qos=0)
    if not done.wait(timeout):
        raise FleetUnreachable(f"no answer from {broker.settings.url} in {timeout}s")
    statuses = []
    for topic, payload in sorted(found.items()):
        if not payload:
            continue
        try:
            statuses.append(decode(JobStatus, payload))
        except DecodeError as exc:
            log.warning("dropped job status on %s: %s", topic, exc)
    return statuses


def driven_elsewhere(status: JobStatus | None, me: str, now: float, lease: float) -> str | None:
    """The coordinator on another machine that drives the job now, if any.

    Coordinators are named ``propctl@HOST:PID``. One on this host is not a rival: the fleet
    lock already keeps passes on one machine apart, and a restarted coordinator (a new pid)
    must take its job back at once. A finished job, or a status older than ``lease``, belongs
    to no one.
    """
    if status is None or status.phase in TERMINAL or now - status.updated_at >= lease:
        return None
    if _host(status.coordinator) == _host(me):
        return None
    return status.coordinator


def _host(name: str) -> str:
    return name.partition("@")[2].rpartition(":")[0]
