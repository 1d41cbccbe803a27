"""Resolve ``module.image`` references during a pass: tag -> manifest -> Wasm layer digest.

A tag that moved shows up as a changed digest (so as a diff); a digest reference never changes.
The proplet receives the layer digest (the module bytes it verifies) and the reference pinned to
the manifest digest (where a proxy or a direct pull finds it). A reference that cannot be
resolved leaves its task unresolved with the registry's reason; the rest of the pass goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from reconciler.desired import DesiredState, ResolvedTask
from reconciler.registry import RegistryClient, RegistryError, Resolved

log = logging.getLogger(__name__)


def resolve_images(
    desired: DesiredState,
    client: RegistryClient,
    progress: Callable[[str], None] | None = None,
) -> DesiredState:
    """Every image task with its digest, size and pinned reference, or its error."""
    references = sorted({t.image for t in desired.all_tasks if t.image is not None})
    if not references:
        return desired
    found: dict[str, Resolved | str] = {}
    for reference in references:
        try:
            found[reference] = client.resolve(reference)
        except RegistryError as exc:
            found[reference] = str(exc)
            log.warning("cannot resolve %s: %s", reference, exc)
    if progress is not None:
        ok = sum(1 for value in found.values() if not isinstance(value, str))
        progress(f"resolved {ok} of {len(references)} image reference(s)")
    return dataclasses.replace(
        desired,
        tasks=tuple(_with(task, found) for task in desired.tasks),
        jobs=tuple(
            dataclasses.replace(job, trainer=_with(job.trainer, found)) for job in desired.jobs
        ),
    )


def _with(task: ResolvedTask, found: dict[str, Resolved | str]) -> ResolvedTask:
    if task.image is None:
        return task
    value = found[task.image]
    if isinstance(value, str):
        return dataclasses.replace(task, digest=None, size=None, error=value)
    return dataclasses.replace(
        task,
        digest=value.layer_digest,
        size=value.size,
        image=str(value.pinned),
        error=None,
    )
