"""Every JSON message of the wire protocol, as strict pydantic models.

Messages are flat and small because the same protocol serves microcontroller boards whose MQTT
buffer is a few KiB. Unknown fields are rejected; a payload that does not validate is dropped by
whoever receives it. Artifact chunks are the one non-JSON payload: raw bytes whose digest and index
are in the topic (see ``schemas.topics``).
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
# A JSON message larger than this is dropped unread. Desired sets are the largest messages.
MAX_MESSAGE_BYTES = 256 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 64

Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256:<64 hex>")]
TaskName = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="DNS label: lower-case letters, digits and '-', at most 63 characters",
    ),
]
PropletId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="1-63 letters, digits, '.', '_' or '-'",
    ),
]
# Integers stay within what every JSON parser (and a board's 64-bit fields) reads exactly.
MAX_INT = 2**53 - 1
Timestamp = Annotated[float, Field(ge=0, description="seconds since the Unix epoch")]
ShortText = Annotated[str, Field(max_length=4096)]


class Message(BaseModel):
    """Base of every wire message: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class Runtime(StrEnum):
    WASMTIME = "wasmtime"
    WAMR = "wamr"


class TaskState(StrEnum):
    """States a proplet reports. ``Pending`` covers queued and fetching."""

    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPED = "Stopped"


TerminalState = Literal[TaskState.COMPLETED, TaskState.FAILED, TaskState.STOPPED]


class Announce(Message):
    """Sent once on every (re)connect: a proplet joining the fleet. QoS 1, not retained."""

    proplet: PropletId
    runtime: Runtime
    labels: dict[str, str] = Field(default_factory=dict)
    max_tasks: int = Field(ge=1, le=1024)
    heartbeat_s: float = Field(gt=0)
    version: str = Field(max_length=64)
    protocol: int = PROTOCOL_VERSION


class Heartbeat(Message):
    """Periodic liveness. QoS 0, not retained; observers judge liveness over several of them."""

    proplet: PropletId
    seq: int = Field(ge=0, le=MAX_INT)
    ts: Timestamp
    interval_s: float = Field(gt=0)
    running: int = Field(ge=0)
    observed_generation: int = Field(ge=0, le=MAX_INT)


class Presence(Message):
    """Whether a proplet is connected. Retained; its last will publishes ``online: false``."""

    proplet: PropletId
    online: bool


FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
FileName = Annotated[
    str,
    Field(
        pattern=FILE_NAME_PATTERN,
        description="a plain file name: 1-63 letters, digits, '.', '_' or '-'",
    ),
]
MAX_TASK_FILES = 8


class ArtifactRef(Message):
    """A file that travels by digest over the chunked transfer: a task's input or output."""

    name: FileName
    digest: Digest
    size: int = Field(ge=0, le=2**32)


class DesiredTask(Message):
    """One task as the proplet must hold it. Limits are flat so a board can read them simply."""

    name: TaskName
    spec_hash: str = Field(min_length=1, max_length=80)
    owner: str = Field(min_length=1, max_length=63)
    digest: Digest
    size: int = Field(ge=0, le=2**32, description="module size in bytes")
    image: str | None = Field(
        default=None, max_length=512, description="OCI reference the digest came from"
    )
    function: str | None = Field(
        default=None, max_length=128, description="exported function; none = WASI command"
    )
    args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    env: dict[str, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict)
    stdin: str | None = Field(default=None, max_length=65536)
    daemon: bool = False
    memory: int | None = Field(
        default=None, ge=65536, le=2**32, description="linear memory cap in bytes"
    )
    timeout_ms: int | None = Field(
        default=None, ge=1, le=MAX_INT, description="wall-clock limit per run"
    )
    fuel: int | None = Field(default=None, ge=1, le=MAX_INT, description="instruction fuel per run")
    inputs: list[ArtifactRef] | None = Field(
        default=None,
        max_length=MAX_TASK_FILES,
        description="artifacts fetched like the module and readable at /in/{name}",
    )
    outputs: int | None = Field(
        default=None,
        ge=1,
        le=2**31,
        description="bytes a run may write under /out; its files are uploaded after the run",
    )


class DesiredSet(Message):
    """The complete task set a proplet must hold. Retained, QoS 1, written by the reconciler.

    A set whose generation is lower than the one the proplet already applied is ignored.
    """

    generation: int = Field(ge=1, le=MAX_INT)
    issued_at: Timestamp | None = None
    issuer: str | None = Field(default=None, max_length=128)
    tasks: list[DesiredTask] = Field(default_factory=list, max_length=1024)


class TaskStatus(Message):
    """One task in a reported state, with a short summary of its last result."""

    name: TaskName
    spec_hash: str = Field(max_length=80)
    owner: str = Field(max_length=63)
    state: TaskState
    restarts: int = Field(default=0, ge=0)
    runs: int = Field(default=0, ge=0)
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    exit_code: int | None = None
    result: str | None = Field(default=None, max_length=256, description="summary, truncated")
    reason: str | None = Field(default=None, max_length=512, description="why failed or waiting")


class ReportedState(Message):
    """Everything a proplet holds. Retained, QoS 1; republished on every change and reconnect."""

    proplet: PropletId
    runtime: Runtime
    labels: dict[str, str] = Field(default_factory=dict)
    max_tasks: int = Field(ge=1, le=1024)
    observed_generation: int = Field(ge=0, le=MAX_INT)
    ts: Timestamp
    tasks: list[TaskStatus] = Field(default_factory=list)
    version: str = Field(default="", max_length=64)


class TaskResult(Message):
    """The full outcome of one run. Retained per task; cleared when the task leaves the set."""

    proplet: PropletId
    task: TaskName
    spec_hash: str = Field(max_length=80)
    state: TerminalState
    runs: int = Field(ge=1)
    started_at: Timestamp
    finished_at: Timestamp
    exit_code: int | None = None
    result: list[str] | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    error: str | None = Field(default=None, max_length=4096)
    outputs: list[ArtifactRef] | None = Field(
        default=None,
        max_length=MAX_TASK_FILES,
        description="files the run wrote under /out, uploaded before this result",
    )


class ArtifactRequest(Message):
    """Ask for an artifact by digest. QoS 1 on the shared request topic.

    The requester chooses the chunk size; ``chunks`` lists the indices still missing (resume),
    or is absent for all of them. ``image`` lets a registry proxy find a digest it has not seen.
    """

    proplet: PropletId
    digest: Digest
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: list[Annotated[int, Field(ge=0, le=2**26)]] | None = Field(
        default=None, max_length=65536
    )
    image: str | None = Field(default=None, max_length=512)


class ArtifactOffer(Message):
    """The answer to a request, sent before its chunks: the size and chunking, or an error."""

    digest: Digest
    size: int = Field(ge=0, le=2**32)
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: int = Field(ge=0, le=2**26)
    error: str | None = Field(default=None, max_length=1024)


class ReconcilerStatus(Message):
    """Where a serving reconciler stands. Retained, QoS 1, rewritten after every pass."""

    reconciler: str = Field(max_length=256, description="who runs the loop: host and pid")
    source: str = Field(max_length=1024, description="repository, ref and path")
    last_attempted_revision: str | None = Field(default=None, max_length=80)
    last_applied_revision: str | None = Field(default=None, max_length=80)
    in_sync: bool
    last_error: str | None = Field(default=None, max_length=4096)
    last_pass_at: Timestamp | None = None
    last_pass_seconds: float | None = Field(default=None, ge=0)
    passes: int = Field(ge=0, le=MAX_INT)
    proplets: int = Field(ge=0)
    proplets_alive: int = Field(ge=0)
    tasks: dict[str, int] = Field(default_factory=dict, description="task count by state")
    ts: Timestamp


class JobPhase(StrEnum):
    WAITING = "Waiting"  # for enough live clients; ``reason`` says why
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"


class RoundRecord(Message):
    """One finished round of a federated job."""

    round: int = Field(ge=1, le=MAX_INT)
    selected: list[PropletId] = Field(default_factory=list)
    participants: list[PropletId] = Field(
        default_factory=list, description="whose updates were aggregated"
    )
    rejected: dict[str, Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, description="proplet -> why its update was refused"
    )
    missing: list[PropletId] = Field(
        default_factory=list, description="selected, but no update before the round closed"
    )
    samples: int = Field(default=0, ge=0, le=MAX_INT)
    train_loss: float | None = None
    loss: float | None = Field(default=None, description="evaluation loss of the new model")
    accuracy: float | None = Field(default=None, description="evaluation accuracy")
    seconds: float = Field(ge=0, description="wall time of the round")
    training_seconds: float = Field(
        default=0.0, ge=0, description="the slowest participant's run time"
    )
    model: Digest


class JobStatus(Message):
    """Where a federated job stands. Retained, QoS 1, rewritten by its coordinator."""

    job: TaskName
    coordinator: str = Field(max_length=256)
    revision: str | None = Field(default=None, max_length=80)
    spec_hash: str = Field(max_length=80, description="the job spec the state belongs to")
    phase: JobPhase
    round: int = Field(ge=0, le=MAX_INT, description="the round in progress or last finished")
    rounds: int = Field(ge=1, le=MAX_INT)
    reason: str | None = Field(default=None, max_length=4096)
    model: Digest
    history: list[RoundRecord] = Field(
        default_factory=list,
        max_length=100,
        description="the most recent rounds, oldest first; the state directory keeps them all",
    )
    started_at: Timestamp
    updated_at: Timestamp


MESSAGES: tuple[type[Message], ...] = (
    Announce,
    Heartbeat,
    Presence,
    DesiredSet,
    ReportedState,
    TaskResult,
    ArtifactRequest,
    ArtifactOffer,
    ReconcilerStatus,
    JobStatus,
)

M = TypeVar("M", bound=Message)


class DecodeError(ValueError):
    """A payload that is not a valid message of the expected kind."""


def decode(model: type[M], payload: bytes) -> M:
    """Parse ``payload`` as ``model`` or raise ``DecodeError`` with a one-line reason."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"{model.__name__}: payload of {len(payload)} bytes exceeds the limit")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        raise DecodeError(
            f"{model.__name__}: {where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from None


def sha256_digest(data: bytes) -> str:
    """The digest of ``data`` as the protocol writes it: ``sha256:<64 lowercase hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size
