"""The pure parts of federated rounds: selection, update checks, aggregation, reports, leases."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from reconciler.coordinator import driven_elsewhere
from reconciler.federated import (
    ModelError,
    Updates,
    check_update,
    from_bytes,
    initial_model,
    parse_report,
    select_clients,
    to_bytes,
    trainer_env,
)
from schemas.manifests import FederatedJobSpec, ModelSource
from schemas.messages import JobPhase, JobStatus
from tests.fldigits import npy

DIGEST = "sha256:" + "0" * 64


def test_model_bytes_round_trip_and_refuse_other_dtypes() -> None:
    model = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(from_bytes(to_bytes(model)), model)
    assert to_bytes(model) == to_bytes(model.copy())  # same array, same bytes, same digest
    with pytest.raises(ModelError, match="float64"):
        from_bytes(npy(model.astype(np.float64)))
    with pytest.raises(ModelError, match=r"not a \.npy"):
        from_bytes(b"garbage")


def test_initial_model_from_shape_is_seeded() -> None:
    source = ModelSource(shape=[3, 4], init="normal", scale=0.5)
    first = initial_model(source, 7, lambda _path: None)
    assert first.shape == (3, 4) and first.dtype == np.float32
    assert np.array_equal(first, initial_model(source, 7, lambda _path: None))
    assert not np.array_equal(first, initial_model(source, 8, lambda _path: None))
    zeros = initial_model(ModelSource(shape=[5]), 0, lambda _path: None)
    assert zeros.tolist() == [0.0] * 5


@pytest.mark.parametrize(
    ("count", "fraction", "minimum", "asked"),
    [(10, 1.0, 1, 10), (10, 0.3, 1, 3), (10, 0.05, 2, 2), (3, 0.5, 5, 3), (10, 0.25, 1, 3)],
)
def test_selection_size(count: int, fraction: float, minimum: int, asked: int) -> None:
    candidates = [f"p{i:02d}" for i in range(count)]
    chosen = select_clients(candidates, fraction, minimum, seed=1, round_=4)
    assert len(chosen) == asked
    assert list(chosen) == sorted(chosen) and set(chosen) <= set(candidates)


def test_selection_depends_on_seed_and_round_not_on_candidate_order() -> None:
    candidates = [f"p{i:02d}" for i in range(20)]
    one = select_clients(candidates, 0.25, 1, seed=3, round_=2)
    assert one == select_clients(list(reversed(candidates)), 0.25, 1, seed=3, round_=2)
    others = {select_clients(candidates, 0.25, 1, seed=3, round_=r) for r in range(3, 9)}
    assert len(others | {one}) > 1


def test_check_update_names_each_problem() -> None:
    base = np.zeros(4, dtype=np.float32)
    good = np.full(4, 0.5, dtype=np.float32)
    assert np.array_equal(check_update(base, to_bytes(good), max_norm=1.0), good)
    with pytest.raises(ModelError, match=r"shape \(5,\), expected \(4,\)"):
        check_update(base, to_bytes(np.zeros(5, dtype=np.float32)), None)
    bad = good.copy()
    bad[1] = np.nan
    bad[2] = np.inf
    with pytest.raises(ModelError, match="2 non-finite values"):
        check_update(base, to_bytes(bad), None)
    with pytest.raises(ModelError, match=r"update norm 1 exceeds maxNorm 0\.5"):
        check_update(base, to_bytes(good), max_norm=0.5)


def test_fedavg_is_the_sample_weighted_mean_whatever_the_arrival_order() -> None:
    rng = np.random.default_rng(0)
    models = [rng.standard_normal(50).astype(np.float32) for _ in range(4)]
    weights = [10.0, 30.0, 5.0, 55.0]
    expected = sum(w * m.astype(np.float64) for w, m in zip(weights, models, strict=True))
    expected = expected / sum(weights)
    in_order = Updates(4, (50,))
    shuffled = Updates(4, (50,))
    for slot in range(4):
        in_order.add(f"c{slot}", models[slot], weights[slot], slot)
    for slot in (2, 0, 3, 1):
        shuffled.add(f"c{slot}", models[slot], weights[slot], slot)
    result = in_order.aggregate("fedavg")
    assert np.allclose(result, expected, atol=1e-6)
    assert np.array_equal(result, shuffled.aggregate("fedavg"))  # bit for bit


def test_missing_slots_weigh_nothing() -> None:
    updates = Updates(3, (2,))
    updates.add("a", np.array([1.0, 1.0], dtype=np.float32), 1.0, 0)
    updates.add("c", np.array([3.0, 5.0], dtype=np.float32), 1.0, 2)
    assert updates.aggregate("fedavg").tolist() == [2.0, 3.0]
    assert updates.aggregate("median").tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="slot 0 already holds"):
        updates.add("again", np.zeros(2, dtype=np.float32), 1.0, 0)


def test_median_and_trimmed_mean_resist_an_outlier() -> None:
    updates = Updates(5, (1,))
    for slot, value in enumerate([1.0, 2.0, 3.0, 4.0, 1000.0]):
        updates.add(f"c{slot}", np.array([value], dtype=np.float32), 1.0)
    assert updates.aggregate("median").tolist() == [3.0]
    assert updates.aggregate("trimmed-mean", 0.2).tolist() == [3.0]  # drops 1 and 1000
    assert updates.aggregate("fedavg").tolist() == [202.0]


@pytest.mark.parametrize(
    ("stdout", "samples", "loss"),
    [
        ('progress\n{"samples": 12, "loss": 0.5}\n', 12, 0.5),
        ('{"samples": 3}\n\n', 3, None),
        ('{"samples": 3, "loss": NaN}', 3, None),
    ],
)
def test_report_is_the_last_json_line(stdout: str, samples: int, loss: float | None) -> None:
    report = parse_report(stdout)
    assert (report.samples, report.loss) == (samples, loss)


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("", "no report line"),
        ("done\n", "not JSON"),
        ('{"samples": 0}', "positive integer"),
        ('{"samples": true}', "positive integer"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_bad_reports_are_refused(stdout: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        parse_report(stdout)


def test_trainer_env_carries_hyperparameters_and_the_round() -> None:
    spec = FederatedJobSpec.model_validate(
        {
            "trainer": {"file": "t.wasm"},
            "model": {"shape": [2]},
            "rounds": 3,
            "hyperparams": {"lr": 0.5, "epochs": 5, "dataset": "digits", "shuffle": True},
            "seed": 9,
        }
    )
    env = trainer_env(spec, "job", 2, 4)
    assert env == {
        "FL_LR": "0.5", "FL_EPOCHS": "5", "FL_DATASET": "digits", "FL_SHUFFLE": "1",
        "FL_JOB": "job", "FL_ROUND": "2", "FL_SEED": "9", "FL_MODE": "train", "FL_ATTEMPT": "4",
    }  # fmt: skip


def status(coordinator: str, phase: JobPhase, updated_at: float) -> JobStatus:
    fields: dict[str, Any] = {
        "job": "j", "coordinator": coordinator, "spec_hash": "x", "phase": phase, "round": 1,
        "rounds": 2, "model": DIGEST, "started_at": 0.0, "updated_at": updated_at,
    }  # fmt: skip
    return JobStatus(**fields)


@pytest.mark.parametrize(
    ("other", "phase", "age", "driven_by"),
    [
        ("propctl@b:1", JobPhase.RUNNING, 5.0, "propctl@b:1"),
        ("propctl@b:1", JobPhase.WAITING, 5.0, "propctl@b:1"),
        ("propctl@b:1", JobPhase.RUNNING, 31.0, None),  # went quiet: its lease ran out
        ("propctl@b:1", JobPhase.COMPLETED, 5.0, None),
        ("propctl@a:2", JobPhase.RUNNING, 5.0, None),  # this host, an earlier process
    ],
)
def test_a_job_is_left_to_a_live_coordinator_on_another_host(
    other: str, phase: JobPhase, age: float, driven_by: str | None
) -> None:
    now = 1000.0
    found = driven_elsewhere(status(other, phase, now - age), "propctl@a:1", now, 30.0)
    assert found == driven_by
    assert driven_elsewhere(None, "propctl@a:1", now, 30.0) is None
