"""The arithmetic of federated rounds: models as bytes, client selection, update checks, and
aggregation. Pure: no broker, no clock, no files; the coordinator brings those.

Models travel as NumPy ``.npy`` files of float32. Clients send back their local model (not a
delta); every method here aggregates local models, which for a weighted mean equals adding the
weighted mean of the deltas to the global model, and for the per-coordinate median and trimmed
mean is the same up to that shift.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas.manifests import FederatedJobSpec, ModelSource

Model = npt.NDArray[np.float32]
MODEL_FILE = "model.npy"
UPDATE_FILE = "update.npy"
NPY_HEADER_ALLOWANCE = 4096  # bytes of .npy header an update may carry besides its data


class ModelError(ValueError):
    """Bytes that are not a float32 model of the expected shape."""


def to_bytes(model: Model) -> bytes:
    """The ``.npy`` bytes of ``model``: the same array always gives the same bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(model, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Model:
    """A float32 array from ``.npy`` bytes, or ``ModelError`` saying what is wrong."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ModelError(f"not a .npy array: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise ModelError("not a single .npy array")
    if array.dtype != np.float32:
        raise ModelError(f"dtype {array.dtype}, expected float32")
    return array


def initial_model(source: ModelSource, seed: int, read: Callable[[str], bytes | None]) -> Model:
    """The round-one global model: the repository file, or a seeded new array."""
    if source.file is not None:
        data = read(source.file)
        if data is None:
            raise ModelError(f"{source.file} does not exist")
        return from_bytes(data)
    shape = tuple(source.shape or ())
    rng = np.random.default_rng(seed)
    if source.init == "normal":
        return (rng.standard_normal(shape) * source.scale).astype(np.float32)
    if source.init == "uniform":
        return rng.uniform(-source.scale, source.scale, shape).astype(np.float32)
    return np.zeros(shape, dtype=np.float32)


def select_clients(
    candidates: Sequence[str], fraction: float, minimum: int, seed: int, round_: int
) -> tuple[str, ...]:
    """The clients asked in ``round_``: a seeded sample of ``fraction`` of the candidates.

    At least ``minimum`` are asked when there are that many. The same candidates, seed and round
    always give the same clients, so a restarted coordinator asks the same ones again.
    """
    pool = sorted(candidates)
    count = min(len(pool), max(minimum, math.ceil(fraction * len(pool))))
    if count >= len(pool):
        return tuple(pool)
    rng = np.random.default_rng([seed, round_])
    picked = rng.choice(len(pool), size=count, replace=False)
    return tuple(sorted(pool[int(i)] for i in picked))


def trainer_env(spec: FederatedJobSpec, job: str, round_: int, attempt: int) -> dict[str, str]:
    """The environment a trainer run gets: FL_ROUND, FL_SEED, FL_JOB, FL_MODE, hyperparameters.

    ``FL_ATTEMPT`` changes when a round is run again (after a coordinator restart, or a round
    that timed out without enough updates), so the proplets run it again; trainers ignore it.
    """
    env = hyperparam_env(spec)
    env.update(
        FL_JOB=job,
        FL_ROUND=str(round_),
        FL_SEED=str(spec.seed),
        FL_MODE="train",
        FL_ATTEMPT=str(attempt),
    )
    return env


def hyperparam_env(spec: FederatedJobSpec) -> dict[str, str]:
    """Each hyperparameter as ``FL_<NAME>`` (booleans as 1 or 0), for training and evaluation."""
    return {f"FL_{name.upper()}": _text(value) for name, value in spec.hyperparams.items()}


def _text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


@dataclass(frozen=True, slots=True)
class Report:
    """What a trainer printed as its last line: the sample count and its figures."""

    samples: int
    loss: float | None = None
    accuracy: float | None = None


def parse_report(stdout: str) -> Report:
    """The last non-empty line of a trainer's stdout as a report, or ``ModelError``."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ModelError("the trainer printed no report line")
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ModelError(f"the report line is not JSON: {lines[-1][:120]!r}") from None
    if not isinstance(data, dict):
        raise ModelError("the report line is not a JSON object")
    samples = data.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ModelError(f"the report needs 'samples' as a positive integer, got {samples!r}")
    return Report(samples, _finite(data.get("loss")), _finite(data.get("accuracy")))


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def check_update(global_model: Model, data: bytes, max_norm: float | None) -> Model:
    """A client's local model, checked: shape, finite values, and the update-norm bound."""
    update = from_bytes(data)
    if update.shape != global_model.shape:
        raise ModelError(f"shape {update.shape}, expected {global_model.shape}")
    bad = int(np.count_nonzero(~np.isfinite(update)))
    if bad:
        raise ModelError(f"{bad} non-finite value{'s' if bad != 1 else ''}")
    if max_norm is not None:
        norm = float(np.linalg.norm((update - global_model).ravel()))
        if not norm <= max_norm:
            raise ModelError(f"update norm {norm:.4g} exceeds maxNorm {max_norm:g}")
    return update


class Updates:
    """Accepted local models of one round, row by row in one preallocated matrix.

    One matrix makes the weighted mean a single matrix-vector product that reads each update
    once, instead of a pass per update; ``benchmarks/fl_aggregate.py`` measures it.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...]) -> None:
        self.shape = shape
        size = int(np.prod(shape)) if shape else 1
        capacity = max(capacity, 1)
        # Zeros, not empty: a row nobody filled has weight 0 and must not be NaN.
        self.matrix: Model = np.zeros((capacity, size), dtype=np.float32)
        self._weights = np.zeros(capacity, dtype=np.float32)
        self._filled = np.zeros(capacity, dtype=bool)
        self.owners: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def weights(self) -> list[float]:
        return [float(w) for w in self._weights[self._filled]]

    def add(self, owner: str, model: Model, weight: float, slot: int | None = None) -> None:
        """Keep ``model`` in row ``slot`` (default: the next free one).

        Rows are summed in slot order, so giving each client a fixed slot (its place among the
        selected) makes the result independent of the order in which updates arrive.
        """
        if slot is None:
            free = np.flatnonzero(~self._filled)
            if free.size == 0:
                raise ValueError("more updates than the round asked for")
            slot = int(free[0])
        if self._filled[slot]:
            raise ValueError(f"slot {slot} already holds the update of {self.owners[slot]}")
        self.matrix[slot] = model.ravel()
        self._weights[slot] = weight
        self._filled[slot] = True
        self.owners[slot] = owner

    def aggregate(self, method: str, trim: float = 0.1) -> Model:
        """The new global model from the accepted updates."""
        count = len(self.owners)
        if count == 0:
            raise ValueError("no updates to aggregate")
        if method == "fedavg":
            # Empty rows weigh 0, so the product runs over the whole matrix without a copy.
            result = (self._weights / self._weights.sum()) @ self.matrix
            return np.asarray(result, dtype=np.float32).reshape(self.shape)
        rows = self.matrix if bool(self._filled.all()) else self.matrix[self._filled]
        if method == "median":
            result = np.median(rows, axis=0)
        elif method == "trimmed-mean":
            cut = math.floor(trim * count)
            if count - 2 * cut < 1:
                cut = (count - 1) // 2
            ordered = np.sort(rows, axis=0)
            result = ordered[cut : count - cut].mean(axis=0)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        return np.asarray(result, dtype=np.float32).reshape(self.shape)


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """The mean of ``values`` weighted by ``weights`` (sample counts), over the keys of both."""
    total = sum(weights[key] for key in values if key in weights)
    if total <= 0:
        return None
    return sum(values[key] * weights[key] for key in values if key in weights) / total
