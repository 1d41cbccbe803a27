"""Models of the manifests users keep in Git (``apiVersion: propeller/v1``), one class per kind.

Manifests are strict: unknown fields are errors, types are not coerced (``replicas: "3"`` is
refused), and each field carries the limits of the wire message it becomes, so a manifest that
validates here always yields a valid ``DesiredTask``. ``kind`` selects the model through
``KINDS``; a new kind (``Function``, ``FederatedJob``) is one more ``Manifest`` subclass there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from schemas.quantities import (
    DURATION_PATTERN,
    MEMORY_PATTERN,
    parse_duration_ms,
    parse_memory,
)

API_VERSION = "propeller/v1"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
PROPLET_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$"
LABEL_VALUE = rf"^({_LABEL_NAME})?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_HOST = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
_PATH_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = (
    rf"^(?P<registry>({_HOST}|\[[0-9A-Fa-f:]+\])(:[0-9]{{1,5}})?)"
    rf"/(?P<repository>{_PATH_COMPONENT}(/{_PATH_COMPONENT})*)"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(@(?P<digest>sha256:[0-9a-f]{64}))?$"
)

WASM_PAGE = 64 * 1024
MAX_WASM32_MEMORY = 4 * 1024**3


def _matching(pattern: str, what: str) -> AfterValidator:
    """A validator with a message a person can act on instead of pydantic's regex dump."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


def _pattern_schema(pattern: str, **extra: Any) -> Any:
    return Field(json_schema_extra={"pattern": pattern, **extra})


DnsLabel = Annotated[
    str,
    _matching(
        DNS_LABEL,
        "a DNS label (lower-case letters, digits and '-', at most 63 characters,"
        " starting and ending with a letter or digit)",
    ),
    _pattern_schema(DNS_LABEL, maxLength=63),
]
PropletName = Annotated[
    str,
    _matching(PROPLET_ID, "a proplet id (1-63 letters, digits, '.', '_' or '-')"),
    _pattern_schema(PROPLET_ID),
]
LabelKey = Annotated[
    str,
    _matching(
        LABEL_KEY,
        "a label key ([prefix/]name, name up to 63 letters, digits, '-', '_' or '.')",
    ),
    _pattern_schema(LABEL_KEY),
]
LabelValue = Annotated[
    str,
    _matching(LABEL_VALUE, "a label value (up to 63 letters, digits, '-', '_' or '.')"),
    _pattern_schema(LABEL_VALUE),
]
EnvName = Annotated[
    str,
    _matching(ENV_NAME, "an environment variable name (letters, digits and '_')"),
    _pattern_schema(ENV_NAME),
]
Text = Annotated[str, Field(max_length=4096)]


def check_repo_path(value: str) -> str:
    """``value`` as a normalized relative path that stays inside the repository."""
    path = PurePosixPath(value)
    if not value or "\\" in value or path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"{value!r} is not a path inside the repository: use a relative path with '/'"
            " and no '..', from the repository root"
        )
    return str(path)


RepoPath = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    AfterValidator(check_repo_path),
]


def _check_image(value: str) -> str:
    match = re.match(IMAGE_REFERENCE, value)
    if match is None:
        raise ValueError(
            f"{value!r} is not an OCI reference: use registry/repository[:tag][@sha256:<64 hex>]"
            ", e.g. ghcr.io/acme/hello:1.0"
        )
    registry = match.group("registry")
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise ValueError(
            f"{value!r} does not name a registry: start with its host,"
            " e.g. ghcr.io/acme/hello:1.0 or localhost:5000/hello:1.0"
        )
    return value


ImageReference = Annotated[
    str,
    Field(max_length=512),
    AfterValidator(_check_image),
    _pattern_schema(re.sub(r"\?P<\w+>", "", IMAGE_REFERENCE)),
]


def _memory(value: object) -> int:
    size = parse_memory(value)
    if size < WASM_PAGE:
        raise ValueError(f"memory {value} is less than one Wasm page (64Ki)")
    if size > MAX_WASM32_MEMORY:
        raise ValueError(f"memory {value} is more than a 32-bit Wasm module can address (4Gi)")
    return size


def _duration(value: object) -> int:
    milliseconds = parse_duration_ms(value)
    if milliseconds < 1:
        raise ValueError(f"duration {value!r} must be at least 1ms")
    return milliseconds


Memory = Annotated[
    int,
    BeforeValidator(_memory),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": WASM_PAGE, "maximum": MAX_WASM32_MEMORY},
                {"type": "string", "pattern": MEMORY_PATTERN},
            ],
            "description": "linear memory cap: bytes, or a size such as 16Mi, 64Ki, 1Gi, 16M",
        }
    ),
]
Duration = Annotated[
    int,
    BeforeValidator(_duration),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "a duration such as 30s, 500ms, 2m, 1h or 1m30s",
        }
    ),
]


class Strict(BaseModel):
    """Base of every manifest model: no unknown fields, no type coercion, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Metadata(Strict):
    name: DnsLabel
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)


class Module(Strict):
    """Where the Wasm module comes from: exactly one of ``file`` or ``image``."""

    file: RepoPath | None = Field(
        default=None, description="path from the repository root, read at the same commit"
    )
    image: ImageReference | None = Field(
        default=None, description="OCI reference: registry/repository[:tag][@sha256:<hex>]"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Module:
        if (self.file is None) == (self.image is None):
            raise ValueError("give exactly one of 'file' or 'image'")
        return self


class Placement(Strict):
    """Which proplets may run the task, and on how many of them."""

    runtime: Literal["wasmtime", "wamr", "any"] = "any"
    selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, description="labels a proplet must all have"
    )
    proplet: PropletName | None = Field(default=None, description="pin to this proplet")
    replicas: int | None = Field(
        default=None, ge=1, le=1024, description="number of distinct proplets; default 1"
    )
    spread: Literal["all"] | None = Field(
        default=None, description="'all': one instance on every matching proplet"
    )

    @model_validator(mode="after")
    def _exclusive(self) -> Placement:
        if self.spread is not None and self.replicas is not None:
            raise ValueError("give either 'replicas' or 'spread: all', not both")
        if self.spread is not None and self.proplet is not None:
            raise ValueError("a task pinned to one 'proplet' cannot also 'spread: all'")
        if self.proplet is not None and self.replicas is not None and self.replicas > 1:
            raise ValueError(
                f"a task pinned to one 'proplet' runs once; replicas must be 1, got {self.replicas}"
            )
        return self

    @property
    def count(self) -> int:
        """Wanted replicas; meaningless when ``spread`` is set."""
        return 1 if self.replicas is None else self.replicas


class Limits(Strict):
    memory: Memory | None = None
    timeout: Duration | None = Field(default=None, description="wall-clock limit per run")
    fuel: int | None = Field(default=None, ge=1, description="instruction fuel per run")


class TaskSpec(Strict):
    module: Module
    function: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="exported function to call; none runs the module as a WASI command",
    )
    args: list[Text] = Field(default_factory=list, max_length=64)
    env: dict[EnvName, Text] = Field(default_factory=dict)
    stdin: str | None = Field(default=None, max_length=65536)
    daemon: bool = Field(
        default=False,
        description="true: keep running, restart on exit; false: run once per spec version",
    )
    placement: Placement = Field(default_factory=Placement)
    limits: Limits = Field(default_factory=Limits)


class Manifest(Strict):
    """Fields every kind shares. Subclasses add ``kind: Literal[...]`` and ``spec``."""

    KIND: ClassVar[str] = ""

    api_version: Literal["propeller/v1"] = Field(alias="apiVersion")
    metadata: Metadata


class Task(Manifest):
    """A Wasm module to run on proplets, once per spec version or kept running (daemon)."""

    KIND: ClassVar[str] = "Task"

    kind: Literal["Task"]
    spec: TaskSpec


HYPERPARAM_NAME = r"^[a-z][a-z0-9_]{0,31}$"
RESERVED_HYPERPARAMS = frozenset({"round", "seed", "mode", "job"})
HyperparamName = Annotated[
    str,
    _matching(HYPERPARAM_NAME, "a hyperparameter name (lower-case letters, digits and '_')"),
    _pattern_schema(HYPERPARAM_NAME),
]
MAX_MODEL_PARAMETERS = 256 * 1024 * 1024  # 1 GiB of float32


class ModelSource(Strict):
    """The initial global model: a ``.npy`` file in the repository, or a shape to initialise."""

    file: RepoPath | None = Field(
        default=None, description="a float32 .npy file, read at the same commit"
    )
    shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, min_length=1, max_length=8, description="dimensions of a new model"
    )
    init: Literal["zeros", "normal", "uniform"] = Field(
        default="zeros", description="how a new model is filled (seeded by spec.seed)"
    )
    scale: float = Field(default=0.01, ge=0, le=1e6, description="spread of normal or uniform")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.file is None) == (self.shape is None):
            raise ValueError("give exactly one of 'file' or 'shape'")
        if self.shape is not None:
            total = 1
            for dimension in self.shape:
                total *= dimension
            if total > MAX_MODEL_PARAMETERS:
                raise ValueError(
                    f"a model of {total} parameters is more than {MAX_MODEL_PARAMETERS}"
                )
        return self


class Clients(Strict):
    """Which proplets train, and how many of them each round."""

    runtime: Literal["wasmtime", "wamr", "any"] = "wasmtime"
    selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, description="labels a client proplet must all have"
    )
    min: int = Field(default=1, ge=1, le=1024, description="updates a round needs to count")
    fraction: float = Field(
        default=1.0, gt=0, le=1, description="share of the live matching proplets asked per round"
    )


class Aggregation(Strict):
    method: Literal["fedavg", "median", "trimmed-mean"] = Field(
        default="fedavg",
        description="fedavg: mean weighted by sample count; median and trimmed-mean: per"
        " coordinate, robust to a few bad clients",
    )
    trim: float = Field(
        default=0.1, ge=0, lt=0.5, description="trimmed-mean: fraction cut at each end"
    )


class Target(Strict):
    """Stop early once the evaluation metric reaches this value."""

    metric: Literal["accuracy", "loss"] = "accuracy"
    value: float


class UpdateBounds(Strict):
    max_norm: float | None = Field(
        default=None,
        gt=0,
        alias="maxNorm",
        description="largest L2 norm of (local model - global model) accepted",
    )


class Evaluation(Strict):
    """Files in the repository the coordinator evaluates each new model on, with the trainer."""

    data: RepoPath = Field(description="directory whose files are mounted read-only at /data")
    files: list[RepoPath] = Field(
        min_length=1, max_length=64, description="paths under 'data', e.g. digits/x.npy"
    )
    limits: Limits = Field(default_factory=Limits)


def _check_tag_reference(value: str) -> str:
    match = re.match(IMAGE_REFERENCE, value)
    if match is not None and match.group("digest") is not None:
        raise ValueError(
            f"{value!r} names a digest, but a push goes to a tag (the digest is known only"
            " after it): use registry/repository[:tag], e.g. ghcr.io/acme/models/digits:final"
        )
    return value


# IMAGE_REFERENCE without its optional "@sha256:..." part, for the exported schema.
_DIGEST_SUFFIX = r"(@(?P<digest>sha256:[0-9a-f]{64}))?$"
assert IMAGE_REFERENCE.endswith(_DIGEST_SUFFIX)
_TAG_REFERENCE = IMAGE_REFERENCE.removesuffix(_DIGEST_SUFFIX) + "$"
TagReference = Annotated[
    str,
    Field(max_length=512),
    AfterValidator(_check_image),
    AfterValidator(_check_tag_reference),
    _pattern_schema(re.sub(r"\?P<\w+>", "", _TAG_REFERENCE)),
]


class Output(Strict):
    """Where the final model goes once the job completes."""

    image: TagReference = Field(
        description="OCI reference to push to: registry/repository[:tag] (tag latest when"
        " none), no digest"
    )


class FederatedJobSpec(Strict):
    trainer: Module
    model: ModelSource
    rounds: int = Field(ge=1, le=100_000)
    clients: Clients = Field(default_factory=Clients)
    round_timeout: Duration = Field(
        default=300_000, alias="roundTimeout", description="longest a round waits for updates"
    )
    wait_timeout: Duration = Field(
        default=600_000,
        alias="waitTimeout",
        description="longest the job waits for 'min' live clients before it fails",
    )
    aggregation: Aggregation = Field(default_factory=Aggregation)
    hyperparams: dict[HyperparamName, str | int | float | bool] = Field(
        default_factory=dict, description="passed to the trainer as FL_<NAME> variables"
    )
    target: Target | None = None
    update_bounds: UpdateBounds = Field(default_factory=UpdateBounds, alias="updateBounds")
    evaluation: Evaluation | None = None
    seed: int = Field(default=0, ge=0, le=2**53 - 1)
    limits: Limits = Field(default_factory=Limits)
    output: Output | None = Field(
        default=None, description="where the final model is pushed as an OCI artifact"
    )

    @model_validator(mode="after")
    def _names(self) -> FederatedJobSpec:
        reserved = sorted(RESERVED_HYPERPARAMS & set(self.hyperparams))
        if reserved:
            raise ValueError(
                f"hyperparams {', '.join(reserved)} are set by the coordinator; rename them"
            )
        if self.target is not None and self.evaluation is None:
            raise ValueError("a 'target' needs an 'evaluation' to measure it")
        return self


class FederatedJob(Manifest):
    """Federated training: rounds of local training in Wasm on proplets, aggregated centrally."""

    KIND: ClassVar[str] = "FederatedJob"

    kind: Literal["FederatedJob"]
    spec: FederatedJobSpec


MANIFESTS: tuple[type[Manifest], ...] = (Task, FederatedJob)
KINDS: Mapping[str, type[Manifest]] = {model.KIND: model for model in MANIFESTS}


class KindError(ValueError):
    """A document whose ``apiVersion`` or ``kind`` selects no model; ``field`` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def model_for(document: Mapping[str, object]) -> type[Manifest]:
    """The model ``document`` selects by ``apiVersion`` and ``kind``, or raise ``KindError``."""
    api_version = document.get("apiVersion")
    if api_version is None:
        raise KindError("apiVersion", f"missing required field 'apiVersion' ({API_VERSION})")
    if api_version != API_VERSION:
        raise KindError("apiVersion", f"apiVersion must be {API_VERSION}, got {api_version!r}")
    kind = document.get("kind")
    known = ", ".join(sorted(KINDS))
    if kind is None:
        raise KindError("kind", f"missing required field 'kind' (one of: {known})")
    if not isinstance(kind, str) or kind not in KINDS:
        raise KindError("kind", f"unknown kind {kind!r} (known kinds: {known})")
    return KINDS[kind]


def parse_manifest(document: Mapping[str, object]) -> Manifest:
    """Validate one plain document; raises ``KindError`` or ``pydantic.ValidationError``."""
    return model_for(document).model_validate(document)


def fields_of(model: type[BaseModel], path: tuple[str | int, ...]) -> tuple[str, ...]:
    """Field names (by alias) of the model found at ``path`` under ``model``, for hints.

    Returns an empty tuple when the path does not lead to a model.
    """
    current: Any = model
    for step in path:
        current = _model_in(current)
        if current is None:
            return ()
        field = _field_by_alias(current, step)
        if field is None:
            return ()
        current = field
    current = _model_in(current)
    if current is None:
        return ()
    return tuple(info.alias or name for name, info in current.model_fields.items())


def _field_by_alias(model: type[BaseModel], step: str | int) -> Any:
    for name, info in model.model_fields.items():
        if step in (name, info.alias):
            return info.annotation
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``X``, ``X | None`` or ``Annotated[X, ...]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
