"""Manifest files of one revision -> ``DesiredState``, or every problem at once with file:line.

YAML is composed into nodes by ruamel's C parser (``ruamel.yaml.clib``; about five times faster
than the pure-Python round-trip loader, which took a second per thousand tasks), and each
document becomes plain Python data plus an index from path (the keys and indices leading to a
node) to the node's line and column, so a pydantic error ``loc`` maps straight back to the line a
person has to fix. Nothing is returned unless every file is valid: a pass that publishes
half a revision would be worse than one that publishes nothing.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from reconciler.desired import DesiredState, ResolvedJob, ResolvedTask, fields_hash
from schemas.manifests import (
    FederatedJob,
    KindError,
    Manifest,
    Placement,
    Task,
    TaskSpec,
    check_repo_path,
    fields_of,
    model_for,
)
from schemas.messages import sha256_digest

log = logging.getLogger(__name__)

NodePath = tuple[Any, ...]
Position = tuple[int, int]  # 1-based line and column


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """One thing wrong with the manifests, where a person can find it (1-based line, column)."""

    file: str
    line: int
    column: int
    message: str
    level: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.level}: {self.message}"


class InvalidManifests(Exception):
    """The revision cannot be applied; ``problems`` lists every reason, sorted by place."""

    def __init__(self, problems: tuple[Problem, ...]) -> None:
        self.problems = tuple(sorted(problems))
        count = len(self.problems)
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} in manifests:\n"
            + "\n".join(str(problem) for problem in self.problems)
        )


@dataclass(slots=True)
class _Document:
    """One YAML document as plain data, with the position of every key and item in it."""

    file: str
    data: Any
    positions: dict[NodePath, Position] = field(default_factory=dict)

    def position(self, path: NodePath) -> Position:
        """Position of the deepest node ``path`` names that exists in the document."""
        for end in range(len(path), -1, -1):
            found = self.positions.get(tuple(path[:end]))
            if found is not None:
                return found
        return (1, 1)

    def problem(self, path: NodePath, message: str) -> Problem:
        line, column = self.position(path)
        return Problem(self.file, line, column, message)


def load(
    files: Mapping[str, bytes], read_module: Callable[[str], bytes | None], revision: str
) -> DesiredState:
    """Validate every manifest of ``revision`` and resolve module files to digests.

    ``files`` maps repository paths of the manifest files to their content; ``read_module``
    returns a repository file's content at the same revision, or ``None`` if it does not exist.
    Raises ``InvalidManifests`` with every problem found in every file.
    """
    problems: list[Problem] = []
    documents: list[tuple[_Document, Manifest | None]] = []
    for file in sorted(files):
        for document in _documents(file, files[file], problems):
            documents.append((document, _validate(document, problems)))

    # Names and module files are checked on invalid documents too, so one pass shows everything.
    problems.extend(_duplicates([document for document, _ in documents]))
    modules: dict[str, str] = {}
    digests: dict[str, tuple[str, int] | None] = {}
    tasks: list[ResolvedTask] = []
    jobs: list[ResolvedJob] = []
    for document, manifest in documents:
        found = _module_file(document, read_module, digests, problems, revision)
        model = _job_files(document, read_module, digests, problems, revision)
        if isinstance(manifest, Task):
            task = _resolve(document, manifest, found)
            if task is not None:
                tasks.append(task)
                if task.digest is not None and manifest.spec.module.file is not None:
                    modules.setdefault(task.digest, manifest.spec.module.file)
        elif isinstance(manifest, FederatedJob):
            job = _resolve_job(document, manifest, found, model)
            if job is not None:
                jobs.append(job)
                if job.trainer.digest is not None and manifest.spec.trainer.file is not None:
                    modules.setdefault(job.trainer.digest, manifest.spec.trainer.file)
    problems.extend(_shared_names(documents))

    if any(problem.level == "error" for problem in problems):
        raise InvalidManifests(tuple(problems))
    tasks.sort(key=lambda task: task.manifest_name)
    jobs.sort(key=lambda job: job.name)
    log.debug(
        "revision %s: %d tasks, %d jobs from %d files", revision, len(tasks), len(jobs), len(files)
    )
    return DesiredState(revision=revision, tasks=tuple(tasks), modules=modules, jobs=tuple(jobs))


def _documents(file: str, content: bytes, problems: list[Problem]) -> Iterator[_Document]:
    """Every non-empty document of a file; YAML errors become problems, not exceptions."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        problems.append(Problem(file, line, 1, f"not UTF-8 text: {exc.reason}"))
        return
    try:
        # A syntax error ends the stream, but the documents before it are still checked.
        constructor = _constructor()
        for node in _yaml().compose_all(text):
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
            try:
                data = constructor.construct_document(node)
            except MarkedYAMLError as exc:
                constructor = _constructor()  # one that raised keeps half-built state
                problems.append(_yaml_problem(file, text, exc))
                continue
            if data is None:
                continue
            if not isinstance(data, dict):
                kind = "a list" if isinstance(data, list) else f"the scalar {data!r}"
                problems.append(
                    Problem(
                        file,
                        line,
                        column,
                        "a manifest must be a mapping with apiVersion, kind, metadata and spec;"
                        f" this document is {kind}",
                    )
                )
                continue
            document = _Document(file, data)
            _index(node, (), document.positions)
            yield document
    except YAMLError as exc:
        problems.append(_yaml_problem(file, text, exc))


def _yaml_problem(file: str, text: str, exc: YAMLError) -> Problem:
    if isinstance(exc, ReaderError):
        before = text[: exc.position]
        first = str(exc).splitlines()[0]
        line = before.count("\n") + 1
        return Problem(file, line, len(before) - before.rfind("\n"), f"invalid YAML: {first}")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if isinstance(exc, DuplicateKeyError):
        return Problem(file, line, column, f"duplicate key: {problem}")
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark.line != (line - 1):
        problem = f"{problem} ({context} at line {context_mark.line + 1})"
    elif context:
        problem = f"{problem} ({context})"
    return Problem(file, line, column, f"invalid YAML: {problem}")


def _yaml() -> YAML:
    return YAML(typ="safe", pure=False)


def _constructor() -> Any:
    return _yaml().constructor


def _index(node: Node, path: NodePath, positions: dict[NodePath, Position]) -> None:
    """Record the position of ``node`` and of every key and item below it.

    A mapping entry is indexed at its key, so an error about a value points at the line that
    names it. Keys merged in with ``<<`` are not indexed; errors there point at the mapping.
    """
    positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            child = (*path, _key(key))
            positions[child] = (key.start_mark.line + 1, key.start_mark.column + 1)
            _index(value, child, positions)
    elif isinstance(node, SequenceNode):
        for number, item in enumerate(node.value):
            _index(item, (*path, number), positions)


def _key(node: ScalarNode) -> Any:
    """A scalar key as the constructor makes it (plain keys resolve to int, bool, ...)."""
    if node.tag == "tag:yaml.org,2002:int":
        try:
            return int(node.value)
        except ValueError:
            return node.value
    return node.value


def _validate(document: _Document, problems: list[Problem]) -> Manifest | None:
    try:
        model = model_for(document.data)
    except KindError as exc:
        path = (exc.field,) if exc.field in document.data else ()
        problems.append(document.problem(path, exc.message))
        return None
    try:
        return model.model_validate(document.data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            path, message = _explain(model, error)
            problems.append(document.problem(path, message))
        return None


def _explain(model: type[Manifest], error: ErrorDetails) -> tuple[NodePath, str]:
    """The path to point at and a message for one pydantic error."""
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "missing":
        parent = loc[:-1]
        return parent, _at(parent, f"missing required field '{loc[-1]}'")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = fields_of(model, tuple(str(step) for step in parent))
        hint = ""
        if allowed:
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
            )
        return loc, _at(parent, f"unknown field '{loc[-1]}'{hint}")
    message = error["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    else:
        value = error.get("input")
        if isinstance(value, str | int | float | bool) and len(repr(value)) <= 80:
            message = f"{message}, got {value!r}"
    return loc, _at(loc, message)


def _at(path: NodePath, message: str) -> str:
    where = ""
    for step in path:
        where += f"[{step}]" if isinstance(step, int) else (f".{step}" if where else str(step))
    return f"{where}: {message}" if where else message


def _dig(data: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(data, dict):
            return None
        data = data.get(step)
    return data


def _duplicates(documents: list[_Document]) -> list[Problem]:
    """One problem at each place a (kind, name) is defined more than once, naming the others."""
    places: dict[tuple[str, str], list[Problem]] = {}
    for document in documents:
        kind, name = _dig(document.data, "kind"), _dig(document.data, "metadata", "name")
        if isinstance(kind, str) and isinstance(name, str):
            places.setdefault((kind, name), []).append(document.problem(("metadata", "name"), ""))
    problems = []
    for (kind, name), found in places.items():
        if len(found) < 2:
            continue
        for here in found:
            others = ", ".join(f"{there.file}:{there.line}" for there in found if there is not here)
            problems.append(
                Problem(
                    here.file,
                    here.line,
                    here.column,
                    f"duplicate {kind} name '{name}' (also defined at {others})",
                )
            )
    return problems


def _module_file(
    document: _Document,
    read_module: Callable[[str], bytes | None],
    digests: dict[str, tuple[str, int] | None],
    problems: list[Problem],
    revision: str,
) -> tuple[str, int] | None:
    """Digest and size of the task's module file; a missing file is a problem.

    Each distinct path is read once, however many tasks name it.
    """
    kind = _dig(document.data, "kind")
    if kind == Task.KIND:
        where: NodePath = ("spec", "module", "file")
    elif kind == FederatedJob.KIND:
        where = ("spec", "trainer", "file")
    else:
        return None
    return _repo_file(document, where, read_module, digests, problems, revision)


def _repo_file(
    document: _Document,
    where: NodePath,
    read_module: Callable[[str], bytes | None],
    digests: dict[str, tuple[str, int] | None],
    problems: list[Problem],
    revision: str,
) -> tuple[str, int] | None:
    """Digest and size of the repository file named at ``where``; a missing file is a problem."""
    raw = _dig(document.data, *where)
    if not isinstance(raw, str):
        return None
    try:
        path = check_repo_path(raw)
    except ValueError:
        return None  # already reported by validation
    if path not in digests:
        content = read_module(path)
        digests[path] = None if content is None else (sha256_digest(content), len(content))
    found = digests[path]
    if found is None:
        problems.append(
            document.problem(
                where, f"{'.'.join(where)}: '{path}' does not exist at revision {revision}"
            )
        )
    return found


def _resolve(document: _Document, task: Task, found: tuple[str, int] | None) -> ResolvedTask | None:
    module = task.spec.module
    digest: str | None = None
    size: int | None = None
    if module.file is not None:
        if found is None:
            return None
        digest, size = found
    line, _column = document.position(())
    return ResolvedTask(
        manifest_name=task.metadata.name,
        labels=dict(task.metadata.labels),
        spec=task.spec,
        digest=digest,
        size=size,
        image=module.image,
        source_file=document.file,
        line=line,
    )


def _job_files(
    document: _Document,
    read_module: Callable[[str], bytes | None],
    digests: dict[str, tuple[str, int] | None],
    problems: list[Problem],
    revision: str,
) -> tuple[str, int] | None:
    """A job's model file and evaluation files must exist; the model's digest and size.

    Read from the plain document, so a job with other problems still gets these checked.
    """
    if _dig(document.data, "kind") != FederatedJob.KIND:
        return None
    model = _repo_file(
        document, ("spec", "model", "file"), read_module, digests, problems, revision
    )
    data, files = (
        _dig(document.data, "spec", "evaluation", "data"),
        _dig(document.data, "spec", "evaluation", "files"),
    )
    if isinstance(data, str) and isinstance(files, list):
        for index, name in enumerate(files):
            if not isinstance(name, str):
                continue
            try:
                path = check_repo_path(f"{data}/{name}")
            except ValueError:
                continue  # reported by validation
            if read_module(path) is None:
                problems.append(
                    document.problem(
                        ("spec", "evaluation", "files", index),
                        f"spec.evaluation.files: '{path}' does not exist at revision {revision}",
                    )
                )
    return model


def _resolve_job(
    document: _Document,
    job: FederatedJob,
    found: tuple[str, int] | None,
    model: tuple[str, int] | None,
) -> ResolvedJob | None:
    """A job with its trainer resolved like a task's module (its files are checked already)."""
    spec = job.spec
    if spec.trainer.file is not None and found is None:
        return None
    digest, size = found if found is not None else (None, None)
    line, _column = document.position(())
    trainer_spec = TaskSpec(
        module=spec.trainer,
        placement=Placement(runtime=spec.clients.runtime, selector=dict(spec.clients.selector)),
        limits=spec.limits,
    )
    trainer = ResolvedTask(
        manifest_name=job.metadata.name,
        labels=dict(job.metadata.labels),
        spec=trainer_spec,
        digest=digest,
        size=size,
        image=spec.trainer.image,
        source_file=document.file,
        line=line,
    )
    identity = {
        "spec": spec.model_dump(mode="json", by_alias=True),
        "trainer": digest or spec.trainer.image,
        "model": model[0] if model is not None else None,
    }
    return ResolvedJob(
        name=job.metadata.name,
        spec=spec,
        trainer=trainer,
        spec_hash=fields_hash(identity),
        source_file=document.file,
        line=line,
        model=model,
    )


def _shared_names(documents: list[tuple[_Document, Manifest | None]]) -> list[Problem]:
    """A job's round tasks carry its name, so no Task may share it."""
    tasks = {m.metadata.name for _d, m in documents if isinstance(m, Task)}
    return [
        document.problem(
            ("metadata", "name"),
            f"FederatedJob '{manifest.metadata.name}' has the name of a Task; its round tasks"
            " would take that task's place: rename one of them",
        )
        for document, manifest in documents
        if isinstance(manifest, FederatedJob) and manifest.metadata.name in tasks
    ]
