"""The desired state of one revision: validated tasks with their modules resolved to digests.

``wire_task`` turns a task into the ``DesiredTask`` a proplet receives. Its ``spec_hash`` covers
every wire field that changes what runs, and nothing else: moving a task or relabelling it does
not restart it, while changing the module, arguments, environment or limits does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.manifests import FederatedJobSpec, TaskSpec
from schemas.messages import ArtifactRef, DesiredTask

# Fields that identify a task or are derived from the rest; everything else is hashed.
_UNHASHED = frozenset({"name", "owner", "spec_hash"})
_DEFAULTS: dict[str, Any] = {
    name: info.get_default(call_default_factory=True)
    for name, info in DesiredTask.model_fields.items()
    if not info.is_required()
}
SPEC_HASH_LENGTH = 16


@dataclass(frozen=True, slots=True)
class ResolvedTask:
    """One Task manifest whose module is known by digest (``file``) or still by reference.

    ``digest`` and ``size`` are ``None`` for an ``image`` module until the pass resolves the
    reference with the registry (``reconciler.images``); then ``digest`` is the Wasm layer's
    digest (the module bytes), ``image`` the reference pinned to the manifest digest, and
    ``error`` says why resolving failed, if it did.
    """

    manifest_name: str
    labels: Mapping[str, str]
    spec: TaskSpec
    digest: str | None
    size: int | None
    image: str | None
    source_file: str
    line: int
    error: str | None = None
    # Set for the tasks of a federated round: files in and out, and the proplets it runs on.
    inputs: tuple[ArtifactRef, ...] = ()
    outputs: int | None = None
    among: frozenset[str] | None = None

    @property
    def resolved(self) -> bool:
        """Whether the module is known well enough (digest and size) to be sent."""
        return self.digest is not None and self.size is not None


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    """One FederatedJob manifest: its trainer resolved like a task's module.

    ``trainer`` is the template every round's task is made from. ``model`` is the digest and
    size of the initial model file (``None`` when the spec gives a shape), and ``spec_hash``
    identifies the job: a new hash is a new job, which starts again from round one.
    """

    name: str
    spec: FederatedJobSpec
    trainer: ResolvedTask
    spec_hash: str
    source_file: str
    line: int
    model: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Every task of one revision, sorted by name, and where each module file lives.

    ``retired`` names tasks to remove wherever they run, with the reason, even without prune:
    the tasks of federated rounds that are over.
    """

    revision: str
    tasks: tuple[ResolvedTask, ...] = ()
    modules: Mapping[str, str] = field(default_factory=dict)  # digest -> repository path
    jobs: tuple[ResolvedJob, ...] = ()
    retired: Mapping[str, str] = field(default_factory=dict)

    @property
    def all_tasks(self) -> tuple[ResolvedTask, ...]:
        """The tasks, and the trainer template of every job (resolved the same way)."""
        return self.tasks + tuple(job.trainer for job in self.jobs)

    def task(self, name: str) -> ResolvedTask | None:
        return next((task for task in self.tasks if task.manifest_name == name), None)


class UnresolvedModule(ValueError):
    """A task whose module digest or size is not known yet cannot go on the wire."""


def wire_task(task: ResolvedTask, owner: str) -> DesiredTask:
    """The message a proplet holds for ``task``, stamped with ``owner`` and its spec hash."""
    if task.digest is None or task.size is None:
        raise UnresolvedModule(
            f"task {task.manifest_name!r}: module {task.image or '?'} has no known digest and size"
        )
    spec = task.spec
    limits = spec.limits
    fields: dict[str, Any] = {
        "digest": task.digest,
        "size": task.size,
        "image": task.image,
        "function": spec.function,
        "args": list(spec.args),
        "env": dict(spec.env),
        "stdin": spec.stdin,
        "daemon": spec.daemon,
        "memory": limits.memory,
        "timeout_ms": limits.timeout,
        "fuel": limits.fuel,
        "inputs": [ref.model_dump() for ref in task.inputs] or None,
        "outputs": task.outputs,
    }
    return DesiredTask(name=task.manifest_name, owner=owner, spec_hash=_hash(fields), **fields)


def spec_hash(task: DesiredTask) -> str:
    """The spec hash of a wire task, computed from its fields (``wire_task`` stamps the same)."""
    return _hash(task.model_dump(mode="json", exclude=set(_UNHASHED)))


def fields_hash(fields: Mapping[str, Any]) -> str:
    """The same short hash over any JSON-able fields (a federated job's spec)."""
    return _hash(fields)


def _hash(fields: Mapping[str, Any]) -> str:
    """First 16 hex digits of sha256 over the canonical JSON of the fields not at default.

    Fields at their default are left out, so a field added to the wire later (with a default)
    does not change the hash of every existing task and restart the fleet.
    """
    hashed = {
        name: value
        for name, value in fields.items()
        if name not in _UNHASHED and (name not in _DEFAULTS or value != _DEFAULTS[name])
    }
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:SPEC_HASH_LENGTH]
