"""The committed fl-digits trainer on real wasmtime, against the numpy reference."""

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from tests.fldigits import EXAMPLE, load

MODEL_SIZE = 650  # (64 features + 1) * 10 classes

Part = tuple[np.ndarray, np.ndarray]
Digits = tuple[Part, Part]
Trainer = tuple[wasmtime.Engine, wasmtime.Module]


prepare = load("prepare")
reference = load("reference")


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    update: Path

    @property
    def result(self) -> dict[str, float]:
        lines = self.stdout.strip().splitlines()
        assert lines, f"no output; stderr: {self.stderr}"
        result: dict[str, float] = json.loads(lines[-1])
        return result


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    engine = wasmtime.Engine()
    return engine, wasmtime.Module.from_file(engine, str(EXAMPLE / "trainer.wasm"))


@pytest.fixture(scope="module")
def digits() -> Digits:
    """One client's share of an IID split of ten (144 samples), and the test split."""
    train, test = prepare.load_split()
    parts = prepare.partition(*train, clients=10, split="iid", seed=0)
    return parts["client-00"], test


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Path:
    root = tmp_path_factory.mktemp("data")
    part, test = digits
    prepare.write_part(root, part)
    # The test split with int32 labels, and a share with one label out of range.
    for name, (x, y) in [
        ("test32", (test[0], test[1].astype("<i4"))),
        ("badlabels", (part[0], np.where(np.arange(len(part[1])) == 5, 10, part[1]))),
    ]:
        (root / name).mkdir()
        np.save(root / name / "x.npy", x)
        np.save(root / name / "y.npy", y)
    return root


def start_model(shape: tuple[int, ...] = (MODEL_SIZE,)) -> np.ndarray:
    """A non-trivial global model: small seeded weights, so every term of the update matters."""
    rng = np.random.default_rng(42)
    return (rng.standard_normal(MODEL_SIZE) * 0.1).astype(np.float32).reshape(shape)


def run_trainer(
    trainer: Trainer,
    tmp_path: Path,
    data_dir: Path,
    model: np.ndarray | bytes,
    env: dict[str, str],
    *,
    out: bool = True,
) -> Run:
    engine, module = trainer
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    model_path = tmp_path / "in" / "model.npy"
    if isinstance(model, bytes):
        model_path.write_bytes(model)
    else:
        np.save(model_path, model)
    config = wasmtime.WasiConfig()
    config.argv = ["trainer"]
    config.env = list(env.items())
    config.preopen_dir(str(tmp_path / "in"), "/in", False)
    config.preopen_dir(str(data_dir), "/data", False)
    if out:
        config.preopen_dir(str(tmp_path / "out"), "/out", True)
    config.stdout_file = str(tmp_path / "stdout")
    config.stderr_file = str(tmp_path / "stderr")
    store = wasmtime.Store(engine)
    store.set_wasi(config)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    try:
        start(store)
        code = 0
    except wasmtime.ExitTrap as exit_:
        code = exit_.code
    return Run(
        code,
        (tmp_path / "stdout").read_text(),
        (tmp_path / "stderr").read_text(),
        tmp_path / "out" / "update.npy",
    )


def npy_bytes(array: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


# --- train mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "round_", "seed", "epochs", "batch", "lr"),
    [
        ((MODEL_SIZE,), 1, 0, 1, 10, 0.1),  # the benchmark's settings; 144 % 10 leaves 4
        ((65, 10), 3, 7, 2, 7, 0.3),  # a 2-D model keeps its shape
        ((MODEL_SIZE,), 12, -5, 3, 500, 0.5),  # a negative seed; one batch holds everything
    ],
)
def test_train_matches_the_reference(
    trainer: Trainer,
    tmp_path: Path,
    data_dir: Path,
    digits: Digits,
    shape: tuple[int, ...],
    round_: int,
    seed: int,
    epochs: int,
    batch: int,
    lr: float,
) -> None:
    (x, y), _ = digits
    model = start_model(shape)
    env = {
        "FL_ROUND": str(round_),
        "FL_SEED": str(seed),
        "FL_EPOCHS": str(epochs),
        "FL_BATCH": str(batch),
        "FL_LR": str(lr),
        "FL_JOB": "digits-test",
        "FL_UNRELATED": "ignored",
    }
    run = run_trainer(trainer, tmp_path, data_dir, model, env)
    assert run.code == 0, run.stderr
    assert run.stderr == ""
    assert len(run.stdout.splitlines()) == 1
    expected = reference.local_train(model, x, y, round_, seed, epochs, batch, lr)

    raw = run.update.read_bytes()
    assert raw[:8] == b"\x93NUMPY\x01\x00"
    assert (10 + struct.unpack("<H", raw[8:10])[0]) % 64 == 0
    update = np.load(run.update)
    assert update.dtype == np.dtype("<f4")
    assert update.shape == shape
    assert np.abs(update - expected.model).max() < 1e-6
    assert not np.array_equal(update, model)
    assert run.result == {"samples": len(y), "loss": pytest.approx(expected.loss, rel=1e-6)}


def test_defaults_are_one_epoch_batches_of_ten_and_lr_0_1(
    trainer: Trainer, tmp_path: Path, data_dir: Path, digits: Digits
) -> None:
    (x, y), _ = digits
    model = np.zeros(MODEL_SIZE, dtype=np.float32)
    run = run_trainer(trainer, tmp_path, data_dir, model, {})
    assert run.code == 0, run.stderr
    expected = reference.local_train(model, x, y, 1, 0, 1, 10, 0.1)
    assert np.abs(np.load(run.update) - expected.model).max() < 1e-6


def test_a_version_2_model_is_accepted(
    trainer: Trainer, tmp_path: Path, data_dir: Path, digits: Digits
) -> None:
    (x, y), _ = digits
    model = start_model()
    run = run_trainer(trainer, tmp_path, data_dir, npy_bytes(model, (2, 0)), {"FL_SEED": "3"})
    assert run.code == 0, run.stderr
    expected = reference.local_train(model, x, y, 1, 3)
    assert np.abs(np.load(run.update) - expected.model).max() < 1e-6


def test_shuffles_differ_by_round_and_epoch() -> None:
    orders = {tuple(reference.permutation(144, 0, r, e).tolist()) for r in (1, 2) for e in (0, 1)}
    assert len(orders) == 4
    assert all(sorted(order) == list(range(144)) for order in orders)


def test_prepare_splits_and_partitions(digits: Digits) -> None:
    train, test = prepare.load_split()
    assert (len(train[1]), len(test[1])) == (1437, 360)
    assert train[0].dtype == np.float32 and train[0].min() >= 0 and train[0].max() <= 1
    iid = prepare.partition(*train, clients=10, split="iid", seed=0)
    noniid = prepare.partition(*train, clients=10, split="noniid", seed=0)
    for parts in (iid, noniid):
        assert list(parts) == [f"client-{i:02d}" for i in range(10)]
        assert sorted(np.concatenate([y for _, y in parts.values()])) == sorted(train[1])
    assert {len(y) for _, y in iid.values()} == {143, 144}
    assert all(len(set(y.tolist())) == 10 for _, y in iid.values())
    assert all(len(set(y.tolist())) <= 4 for _, y in noniid.values())
    assert np.array_equal(digits[0][1], iid["client-00"][1])


def test_reference_fedavg_learns() -> None:
    train, test = prepare.load_split()
    parts = prepare.partition(*train, clients=10, split="iid", seed=0)
    history = reference.fedavg(parts, test, rounds=2, epochs=1, lr=0.5, clients_per_round=0.5)
    assert [h["round"] for h in history] == [1, 2]
    assert [h["clients"] for h in history] == [5, 5]
    assert history[-1]["accuracy"] > 0.75  # chance is 0.1
    assert history[-1]["loss"] < history[0]["loss"]
    assert reference.sample_clients(10, 5, 0, 1) != reference.sample_clients(10, 5, 0, 2)


# --- evaluate mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["digits", "test32"])
def test_evaluate_reports_argmax_accuracy(
    trainer: Trainer, tmp_path: Path, data_dir: Path, digits: Digits, dataset: str
) -> None:
    (x, y), test = digits
    if dataset == "test32":
        x, y = test
    model = start_model()
    env = {"FL_MODE": "evaluate", "FL_DATASET": dataset}
    run = run_trainer(trainer, tmp_path, data_dir, model, env, out=False)
    assert run.code == 0, run.stderr
    weights, bias = model[:640].reshape(64, 10), model[640:]
    predicted = (x.astype(np.float64) @ weights + bias).argmax(axis=1)
    result = run.result
    assert result["samples"] == len(y)
    assert result["accuracy"] == (predicted == y).sum() / len(y)
    assert 0.1 < result["accuracy"] < 0.9  # a random model is neither hopeless nor trained
    assert result["loss"] == pytest.approx(reference.evaluate(model, x, y).loss, rel=1e-9)
    assert not run.update.exists()


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "env", "code", "message"),
    [
        (np.zeros(640, np.float32), {}, 2, "does not fit 64 features"),
        (np.zeros(MODEL_SIZE, np.float64), {}, 2, "unsupported dtype '<f8'"),
        (np.zeros((65, 10), np.float32, order="F"), {}, 2, "Fortran order"),
        (b"\x93NUMPY\x03\x00" + npy_bytes(np.zeros(MODEL_SIZE, np.float32))[8:], {}, 2, "version"),
        (b"PK\x03\x04 not a npy file", {}, 2, "bad magic"),
        (npy_bytes(np.zeros(MODEL_SIZE, np.float32))[:-4], {}, 2, "data is 2596 bytes"),
        (np.full(MODEL_SIZE, np.nan, np.float32), {}, 2, "not finite"),
        (np.zeros(MODEL_SIZE, np.float32), {"FL_DATASET": "missing"}, 1, "/data/missing/x.npy"),
        (np.zeros(MODEL_SIZE, np.float32), {"FL_DATASET": "../in"}, 2, "FL_DATASET"),
        (np.zeros(MODEL_SIZE, np.float32), {"FL_DATASET": "badlabels"}, 2, "label 10"),
        (np.zeros(MODEL_SIZE, np.float32), {"FL_LR": "-1"}, 2, "FL_LR"),
        (np.zeros(MODEL_SIZE, np.float32), {"FL_EPOCHS": "0"}, 2, "FL_EPOCHS"),
        (np.zeros(MODEL_SIZE, np.float32), {"FL_MODE": "predict"}, 2, "FL_MODE"),
        (np.zeros(MODEL_SIZE, np.float32), {"FL_MODEL": "mlp"}, 2, "FL_MODEL"),
        (start_model(), {"FL_LR": "1e300"}, 3, "diverged"),
    ],
    ids=[
        "wrong-size",
        "float64",
        "fortran",
        "version-3",
        "not-npy",
        "truncated",
        "nan",
        "missing-dataset",
        "dataset-escape",
        "label-range",
        "bad-lr",
        "zero-epochs",
        "bad-mode",
        "unknown-model",
        "diverged",
    ],
)
def test_errors_exit_non_zero_with_a_message(
    trainer: Trainer,
    tmp_path: Path,
    data_dir: Path,
    model: np.ndarray | bytes,
    env: dict[str, str],
    code: int,
    message: str,
) -> None:
    run = run_trainer(trainer, tmp_path, data_dir, model, env)
    assert run.code == code
    assert message in run.stderr
    assert run.stderr.startswith("trainer: ")
    assert run.stdout == ""
    assert not run.update.exists()
