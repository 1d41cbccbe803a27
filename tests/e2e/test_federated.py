"""Federated jobs end to end: ``propctl apply --wait`` coordinates rounds on real proplets.

The digits job runs the real trainer (examples/fl-digits) and is checked against the in-process
reference, which computes the same local models. The fault scenarios use ``tests/wasm/fltoy``,
a trainer whose update is known in advance (the global model plus one), so the final model of a
job tells exactly whose updates were counted.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reconciler.federated import Updates, from_bytes
from tests.broker import Mosquitto
from tests.e2e.serve_support import Serve
from tests.e2e.support import WASM_DIR, Propctl, to_yaml
from tests.fldigits import EXAMPLE, load, npy
from tests.fleet import Fleet
from tests.gitrepo import GitRepo

JOB_SECONDS = 60.0


def job_manifest(name: str, trainer: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "trainer": {"file": trainer},
        "model": {"shape": [4]},
        "rounds": 2,
        "clients": {"selector": {"fl": "yes"}, "min": 2},
        "roundTimeout": "20s",
        "waitTimeout": "20s",
        "limits": {"timeout": "20s"},
    }
    base.update(spec)
    return {
        "apiVersion": "propeller/v1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": base,
    }


def start_clients(fleet: Fleet, names: list[str], data: dict[str, dict[str, bytes]]) -> None:
    for name in names:
        for path, content in data.get(name, {}).items():
            target = fleet.tmp / name / "data" / path  # the agent shows data/ at /data
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    for name in names:
        fleet.start_proplet(name, "--label", "fl=yes", wait=False)
    for name in names:
        fleet.wait(lambda o, n=name: o.presence.get(n) is True and n in o.states,
                   timeout=15, what=f"{name} online")  # fmt: skip


def apply_job(propctl: Propctl, repo: GitRepo, state: Path, code: int = 0) -> dict[str, Any]:
    result = propctl.run(
        "apply", "--repo", repo.url, "--wait", "--state-dir", str(state), "-o", "json",
        timeout=JOB_SECONDS,
    )  # fmt: skip
    assert result.code == code, str(result)
    report: dict[str, Any] = result.json()
    return report


def round_under_way(checkpoint: Path, number: int, timeout: float = 30.0) -> bool:
    """Wait until the job's checkpoint shows round ``number`` started; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saved = json.loads(checkpoint.read_text()) if checkpoint.exists() else {}
        if saved.get("completed", 0) >= number - 1 and saved.get("attempt", 0) >= 1:
            return True
        time.sleep(0.05)
    return False


def final_model(state: Path, job: str) -> np.ndarray:
    return from_bytes((state / "jobs" / job / "final.npy").read_bytes())


def test_digits_job_matches_the_in_process_reference(
    fleet: Fleet, propctl: Propctl, tmp_path: Path
) -> None:
    prepare, reference = load("prepare"), load("reference")
    (train, test) = prepare.load_split()
    partitions = prepare.partition(train[0], train[1], 4, "iid", 0)
    ids = sorted(partitions)
    data = {}
    for name, (x, y) in partitions.items():
        data[name] = {"digits/x.npy": npy(x), "digits/y.npy": npy(y)}
    start_clients(fleet, ids, data)

    repo = GitRepo(tmp_path / "git")
    repo.copy(EXAMPLE / "trainer.wasm", "fl/trainer.wasm")
    repo.write("fl/eval/digits/x.npy", npy(test[0]))
    repo.write("fl/eval/digits/y.npy", npy(test[1]))
    hyper = {"dataset": "digits", "epochs": 1, "batch": 10, "lr": 0.1}
    manifest = job_manifest(
        "digits", "fl/trainer.wasm", model={"shape": [650]}, rounds=3,
        clients={"selector": {"fl": "yes"}, "min": 4}, hyperparams=hyper,
        evaluation={"data": "fl/eval", "files": ["digits/x.npy", "digits/y.npy"]},
    )  # fmt: skip
    repo.write("fleet/job.yaml", to_yaml(manifest))
    repo.push("digits job")

    state = tmp_path / "state"
    report = apply_job(propctl, repo, state)
    [job] = report["jobs"]
    assert job["phase"] == "Completed", job
    assert [r["round"] for r in job["history"]] == [1, 2, 3]
    for record in job["history"]:
        assert record["participants"] == ids and record["rejected"] == {}
        assert record["samples"] == len(train[1])

    # The same rounds in one process: the trainer's local models, aggregated the same way.
    model = np.zeros(650, dtype=np.float32)
    for round_ in (1, 2, 3):
        updates = Updates(len(ids), model.shape)
        for name in ids:
            x, y = partitions[name]
            local = reference.local_train(model, x, y, round_, 0, 1, 10, 0.1)
            updates.add(name, np.asarray(local.model, dtype=np.float32), float(local.samples))
        model = updates.aggregate("fedavg")
        accuracy = reference.evaluate(model, test[0], test[1]).accuracy
        assert job["history"][round_ - 1]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert np.array_equal(final_model(state, "digits"), model)

    listed = propctl.ok("get", "jobs", "-o", "json").json()
    assert [(j["job"], j["phase"], j["round"]) for j in listed] == [("digits", "Completed", 3)]
    chart = tmp_path / "digits.svg"
    shown = propctl.ok("get", "jobs", "digits", "--chart", str(chart))
    assert "accuracy" in shown.stdout.splitlines()[0].lower()
    assert chart.read_text().count("<polyline") == 2

    # The round tasks are gone from every proplet once the job is over.
    for name in ids:
        fleet.wait(lambda o, n=name: not [t for t in o.states[n].tasks if t.name == "digits"],
                   timeout=10, what=f"digits task removed from {name}")  # fmt: skip


def toy_repo(tmp_path: Path, **spec: Any) -> GitRepo:
    repo = GitRepo(tmp_path / "git")
    repo.copy(WASM_DIR / "fltoy.wasm", "fl/fltoy.wasm")
    repo.write("fleet/job.yaml", to_yaml(job_manifest("toy", "fl/fltoy.wasm", **spec)))
    repo.push("toy job")
    return repo


def test_bad_updates_are_rejected_with_their_proplet(
    fleet: Fleet, propctl: Propctl, tmp_path: Path
) -> None:
    faults = {"bad-nan": "nan", "bad-shape": "shape", "bad-norm": "norm", "bad-trap": "trap",
              "bad-exit": "fail"}  # fmt: skip
    good = ["good-1", "good-2"]
    data = {name: {"fault": fault.encode()} for name, fault in faults.items()}
    data["good-1"] = {"samples": b"30"}
    start_clients(fleet, [*good, *faults], data)
    repo = toy_repo(tmp_path, updateBounds={"maxNorm": 100.0})

    state = tmp_path / "state"
    [job] = apply_job(propctl, repo, state)["jobs"]
    assert job["phase"] == "Completed"
    for record in job["history"]:
        assert record["participants"] == good
        rejected = record["rejected"]
        assert set(rejected) == set(faults)
        assert "non-finite" in rejected["bad-nan"]
        assert "shape (5,), expected (4,)" in rejected["bad-shape"]
        assert "exceeds maxNorm 100" in rejected["bad-norm"]
        assert "trainer failed" in rejected["bad-trap"]
        assert "trainer failed" in rejected["bad-exit"]
        assert record["samples"] == 40  # 30 + 10: weights come from the reports
    # Only the good updates counted: each round adds exactly one.
    assert final_model(state, "toy").tolist() == [2.0, 2.0, 2.0, 2.0]


def test_a_client_killed_mid_round_does_not_hold_the_round(
    fleet: Fleet, propctl: Propctl, tmp_path: Path
) -> None:
    names = ["alive-1", "alive-2", "doomed"]
    start_clients(fleet, names, {"doomed": {"fault": b"slow"}})
    repo = toy_repo(tmp_path, roundTimeout="60s")
    state = tmp_path / "state"
    process = propctl.popen(
        "apply", "--repo", repo.url, "--wait", "--state-dir", str(state), "-o", "json"
    )
    try:
        doomed = next(p for p in fleet.proplets if p.id == "doomed")
        fleet.wait(
            lambda o: any(t.name == "toy" and t.state.value == "Running"
                          for t in o.states["doomed"].tasks),
            timeout=20, what="the slow client training",
        )  # fmt: skip
        killed_at = time.monotonic()
        doomed.kill()
        out, err = process.communicate(timeout=JOB_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    [job] = json.loads(out)["jobs"]
    first, second = job["history"]
    assert first["participants"] == ["alive-1", "alive-2"]
    assert first["missing"] == ["doomed"]
    assert first["seconds"] < 10, "the round waited for its timeout instead of the will"
    assert time.monotonic() - killed_at < 30
    assert second["selected"] == ["alive-1", "alive-2"]  # the dead client is not asked again
    assert final_model(state, "toy").tolist() == [2.0, 2.0, 2.0, 2.0]


def test_a_restarted_coordinator_resumes_at_the_interrupted_round(
    fleet: Fleet, propctl: Propctl, tmp_path: Path
) -> None:
    names = ["c-1", "c-2", "c-3"]
    start_clients(fleet, names, {name: {"fault": b"slow"} for name in names})
    repo = toy_repo(tmp_path, rounds=4, clients={"selector": {"fl": "yes"}, "min": 3})
    state = tmp_path / "state"
    checkpoint = state / "jobs" / "toy" / "state.json"

    first = propctl.popen("apply", "--repo", repo.url, "--wait", "--state-dir", str(state))
    try:
        if not round_under_way(checkpoint, 3):
            pytest.fail("the job did not reach round 3")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    saved = json.loads(checkpoint.read_text())
    assert saved["completed"] == 2

    [job] = apply_job(propctl, repo, state)["jobs"]
    assert job["phase"] == "Completed"
    assert [r["round"] for r in job["history"]] == [1, 2, 3, 4]
    # Every round counted every client once: the same model as an uninterrupted run.
    assert final_model(state, "toy").tolist() == [4.0, 4.0, 4.0, 4.0]
    assert all(r["participants"] == names for r in job["history"])


def test_too_few_clients_waits_then_fails_with_the_reason(
    fleet: Fleet, propctl: Propctl, tmp_path: Path
) -> None:
    start_clients(fleet, ["only"], {})
    repo = toy_repo(tmp_path, waitTimeout="2s", clients={"selector": {"fl": "yes"}, "min": 2})
    started = time.monotonic()
    [job] = apply_job(propctl, repo, tmp_path / "state", code=1)["jobs"]
    assert time.monotonic() - started < 20
    assert job["phase"] == "Failed"
    assert "2 live client(s)" in job["reason"] and "1 alive" in job["reason"]


def test_serve_drives_a_job_and_resumes_it_after_a_restart(
    fleet: Fleet, broker: Mosquitto, propctl: Propctl, tmp_path: Path
) -> None:
    names = ["s-1", "s-2"]
    start_clients(fleet, names, {name: {"fault": b"slow"} for name in names})
    repo = toy_repo(tmp_path, rounds=3)
    serve = Serve(broker.url, tmp_path / "serve", repo.url, interval="30s")
    checkpoint = serve.state_dir / "jobs" / "toy" / "state.json"
    try:
        if not round_under_way(checkpoint, 2):
            pytest.fail(f"serve did not reach round 2:\n{serve.log()[-3000:]}")
        serve.process.kill()  # no clean stop: the round in flight is lost
        serve.process.wait(10)
    finally:
        serve.stop()
    assert json.loads(checkpoint.read_text())["completed"] == 1

    again = Serve(broker.url, tmp_path / "serve", repo.url, interval="30s")
    try:
        deadline = time.monotonic() + 30
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            listed = propctl.ok("get", "jobs", "-o", "json").json()
            job = listed[0] if listed else {}
            if job.get("phase") == "Completed":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the job did not complete: {job}\n{again.log()[-3000:]}")
    finally:
        assert again.stop() == 0
    assert [r["round"] for r in job["history"]] == [1, 2, 3]
    assert final_model(again.state_dir, "toy").tolist() == [3.0, 3.0, 3.0, 3.0]
    # Rounds moved without waiting for the 30 s timer or the gap between triggered passes.
    assert all(r["seconds"] < 5 for r in job["history"])


def test_apply_without_wait_says_the_job_needs_a_coordinator(
    fleet: Fleet, propctl: Propctl, tmp_path: Path
) -> None:
    start_clients(fleet, ["w-1", "w-2"], {})
    repo = toy_repo(tmp_path)
    result = propctl.ok("apply", "--repo", repo.url, "-o", "json")
    assert "rounds run only under apply --wait or propctl serve" in result.stderr
    report = result.json()
    assert report["jobs"] == [] and report["actions"] == []
    assert propctl.ok("get", "jobs", "-o", "json").json() == []
