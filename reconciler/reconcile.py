"""One reconcile pass, end to end: fetch, load, observe, plan, converge.

Every entry point (``propctl apply``, ``diff``, the serve loop) runs these same stages; each
stage returns a typed value and reports progress between stages.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from reconciler.artifacts import ArtifactServer
from reconciler.broker import Broker
from reconciler.converge import FAILED_OUTCOMES, Outcome, converge
from reconciler.coordinator import Coordinator, coordinating, with_jobs
from reconciler.desired import DesiredState, ResolvedTask
from reconciler.loader import load
from reconciler.lock import fleet_lock, lock_path
from reconciler.observe import FleetView
from reconciler.observed import ObservedState
from reconciler.plan import DEFAULT_OWNER, Plan, plan
from reconciler.source import Revision, Source, default_cache_dir
from schemas.connection import BrokerSettings
from schemas.messages import JobPhase, JobStatus

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _quiet(_line: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class PassOptions:
    prune: bool = False
    dry_run: bool = False
    wait: bool = False
    timeout: float = 60.0
    owner: str = DEFAULT_OWNER
    cache_dir: Path | None = None
    insecure_registry: bool = False  # plain HTTP to registries (a registry on loopback)
    state_dir: Path | None = None  # federated jobs' checkpoints; default: under cache_dir


@dataclass(frozen=True, slots=True)
class PassResult:
    revision: str
    plan: Plan
    outcomes: tuple[Outcome, ...]
    timings: dict[str, float] = field(default_factory=dict)
    jobs: tuple[JobStatus, ...] = ()

    @property
    def failed(self) -> bool:
        return (
            any(o.outcome in FAILED_OUTCOMES for o in self.outcomes)
            or any(o.outcome == "pending" and o.action.kind == "pending" for o in self.outcomes)
            or any(job.phase == JobPhase.FAILED for job in self.jobs)
        )

    @property
    def in_sync(self) -> bool:
        settled = {"applied", "running", "completed", "unchanged"}
        return all(o.outcome in settled for o in self.outcomes)


def fetch_desired(
    source: Source, progress: Progress = _quiet, *, images: bool = False, insecure: bool = False
) -> tuple[Revision, DesiredState]:
    """Fetch and validate; with ``images``, resolve OCI references with their registries.

    Raises ``SourceError`` or ``InvalidManifests``; a reference that does not resolve is not an
    error here: its task stays unresolved with the reason, and the plan reports it pending.
    """
    revision = source.fetch()
    progress(f"fetched {revision.origin} at {revision.short} ({len(revision.files)} files)")
    desired = load(revision.files, revision.read, revision.id)
    progress(
        f"loaded {len(desired.tasks)} task(s)"
        + (f" and {len(desired.jobs)} federated job(s)" if desired.jobs else "")
    )
    if images and any(task.image is not None for task in desired.all_tasks):
        from reconciler.images import resolve_images
        from reconciler.registry import RegistryClient

        with RegistryClient.from_env(insecure=insecure) as client:
            desired = resolve_images(desired, client, progress)
    return revision, desired


@contextmanager
def connected(
    settings: BrokerSettings, *, results: bool = False
) -> Iterator[tuple[Broker, FleetView]]:
    """A broker connection with a fleet view that holds the full snapshot."""
    broker = Broker(settings)
    broker.connect()
    try:
        view = FleetView(settings.namespace)
        view.attach(broker, results=results)
        yield broker, view
    finally:
        broker.close()


def fleet_key(settings: BrokerSettings) -> str:
    return f"{settings.url}/{settings.namespace.root}"


def issuer() -> str:
    return f"propctl@{socket.gethostname()}:{os.getpid()}"


def reconcile(
    source: Source,
    settings: BrokerSettings,
    options: PassOptions,
    progress: Progress = _quiet,
) -> PassResult:
    """One pass. Invalid input stops it before anything is sent.

    With ``wait`` and federated jobs in the revision, the pass then drives the jobs, round by
    round, until each has completed or failed; without ``wait`` it leaves their rounds as
    they are (``propctl serve`` drives them too).
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    revision, desired = fetch_desired(
        source, progress, images=True, insecure=options.insecure_registry
    )
    timings["fetch_load"] = time.perf_counter() - started
    cache_dir = options.cache_dir or default_cache_dir()
    with fleet_lock(lock_path(cache_dir, fleet_key(settings)), on_wait=progress):
        mark = time.perf_counter()
        with connected(settings) as (broker, view):
            timings["connect"] = time.perf_counter() - mark
            if options.dry_run:
                return run_pass(broker, view, desired, options, progress, timings)
            modules = module_reader(revision, desired)
            if not (options.wait and desired.jobs):
                if desired.jobs:
                    names = ", ".join(job.name for job in desired.jobs)
                    progress(
                        f"federated job(s) {names}: rounds run only under apply --wait or"
                        " propctl serve; this pass leaves their tasks as they are"
                    )
                with ArtifactServer(broker, settings.namespace, modules):
                    return run_pass(broker, view, desired, options, progress, timings)
            state_dir = options.state_dir or cache_dir / "state"
            with coordinating(
                broker, settings.namespace, state_dir, name=issuer(), owner=options.owner,
                progress=progress, modules=modules, insecure_registry=options.insecure_registry,
            ) as coordinator:  # fmt: skip
                coordinator.set_jobs(desired, revision.read)

                def lookup(digest: str) -> bytes | None:
                    return modules(digest) or coordinator.lookup(digest)

                with ArtifactServer(broker, settings.namespace, lookup):
                    return drive_jobs(
                        broker, view, desired, coordinator, options, progress, timings
                    )


def drive_jobs(
    broker: Broker,
    view: FleetView,
    desired: DesiredState,
    coordinator: Coordinator,
    options: PassOptions,
    progress: Progress,
    timings: dict[str, float],
) -> PassResult:
    """The first pass as usual, then a pass each time a round starts or the jobs end."""
    names = {job.name for job in desired.jobs}
    tasks, retired = coordinator.step(view.observed())
    result = run_pass(
        broker, view, with_jobs(desired, tasks, retired), options, progress, timings,
        unwatched=names,
    )  # fmt: skip
    quiet_options = replace(options, wait=False)
    last = job_key(tasks, retired)
    while True:
        tasks, retired = coordinator.step(view.observed())
        key = job_key(tasks, retired)
        if key != last:
            run_pass(broker, view, with_jobs(desired, tasks, retired), quiet_options, _quiet, {})
            last = key
        if not coordinator.active:
            break
        deadline = coordinator.next_deadline()
        coordinator.wait(min(1.0, deadline - time.time()) if deadline is not None else 1.0)
    statuses = tuple(coordinator.status(run) for run in coordinator.runs.values())
    # A round's tasks are reported through their job: a trainer that failed is a rejected
    # update there, not a failed pass.
    outcomes = tuple(o for o in result.outcomes if o.action.task not in names)
    return replace(result, outcomes=outcomes, jobs=statuses)


def job_key(tasks: list[ResolvedTask], retired: Mapping[str, str]) -> tuple[object, ...]:
    return (
        tuple((t.manifest_name, t.spec.env.get("FL_ROUND"), t.spec.env.get("FL_ATTEMPT"), t.among)
              for t in tasks),
        tuple(sorted(retired)),
    )  # fmt: skip


def run_pass(
    broker: Broker,
    view: FleetView,
    desired: DesiredState,
    options: PassOptions,
    progress: Progress,
    timings: dict[str, float],
    observe: Callable[[], ObservedState] | None = None,
    republish: Collection[str] = (),
    unwatched: Collection[str] = (),
) -> PassResult:
    """Observe, plan and converge on an open connection; the caller serves the modules."""
    mark = time.perf_counter()
    observed = (observe or view.observed)()
    timings["observe"] = time.perf_counter() - mark
    alive = sum(1 for p in observed.proplets.values() if p.alive)
    lost = sum(1 for p in observed.proplets.values() if p.lost)
    progress(
        f"observed {len(observed.proplets)} proplet(s), {alive} alive"
        + (f", {lost} lost" if lost else "")
    )
    mark = time.perf_counter()
    the_plan = plan(
        desired, observed, prune=options.prune, owner=options.owner, republish=republish
    )
    timings["plan"] = time.perf_counter() - mark
    changes = [a for a in the_plan.actions if a.kind not in ("unchanged", "orphan")]
    progress(f"planned {len(changes)} change(s) on {len(the_plan.sets)} proplet(s)")
    mark = time.perf_counter()
    outcomes = converge(
        broker,
        view,
        the_plan,
        issuer=issuer(),
        wait=options.wait,
        timeout=options.timeout,
        progress=progress,
        serving=desired.modules.keys(),
        dry_run=options.dry_run,
        unwatched=unwatched,
    )
    timings["converge"] = time.perf_counter() - mark
    return PassResult(desired.revision, the_plan, outcomes, timings)


def module_reader(revision: Revision, desired: DesiredState) -> Callable[[str], bytes | None]:
    cache: dict[str, bytes | None] = {}

    def lookup(digest: str) -> bytes | None:
        if digest not in cache:
            path = desired.modules.get(digest)
            cache[digest] = revision.read(path) if path is not None else None
        return cache[digest]

    return lookup


def diff(
    source: Source, settings: BrokerSettings, options: PassOptions, progress: Progress = _quiet
) -> tuple[str, Plan]:
    """What a pass would do, without the lock and without sending anything."""
    revision, desired = fetch_desired(
        source, progress, images=True, insecure=options.insecure_registry
    )
    with connected(settings) as (_broker, view):
        observed = view.observed()
    return revision.id, plan(desired, observed, prune=options.prune, owner=options.owner)
