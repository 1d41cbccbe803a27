"""A federated job with ``output``: ``propctl apply --wait`` pushes its final model to a registry.

The trainer is ``tests/wasm/fltoy`` (its update is the global model plus one), so after two
rounds from zeros the final model is known exactly, and the registry must hold those bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from reconciler.registry import MODEL_ARTIFACT, RegistryClient
from tests.e2e.support import Propctl
from tests.e2e.test_federated import JOB_SECONDS, start_clients, toy_repo
from tests.fleet import Fleet
from tests.registry import Registry


def test_a_completed_job_pushes_its_final_model(
    fleet: Fleet, propctl: Propctl, registry: Registry, tmp_path: Path
) -> None:
    start_clients(fleet, ["c-1", "c-2"], {})
    ref = f"{registry.address}/fl/toy:final"
    repo = toy_repo(tmp_path, output={"image": ref})
    state = tmp_path / "state"

    result = propctl.run(
        "apply", "--repo", repo.url, "--wait", "--insecure-registry", "--state-dir", str(state),
        "-o", "json", timeout=JOB_SECONDS,
    )  # fmt: skip
    assert result.code == 0, str(result)
    [job] = result.json()["jobs"]
    assert (job["phase"], job["round"], job["reason"]) == ("Completed", 2, None)

    with RegistryClient(insecure=True) as client:
        resolved = client.resolve(ref, MODEL_ARTIFACT)
        pulled = client.pull_model(ref)
    model = np.load(io.BytesIO(pulled), allow_pickle=False)
    assert model.dtype == np.float32
    assert model.tolist() == [2.0, 2.0, 2.0, 2.0]
    assert pulled == (state / "jobs" / "toy" / "final.npy").read_bytes()
    assert resolved.layer_digest == job["model"]
    assert resolved.annotations["dev.propeller.job"] == "toy"
    assert resolved.annotations["dev.propeller.rounds"] == "2"
    assert f"job toy: pushed final model to {ref} as {resolved.manifest_digest}" in result.stderr
