"""Models in a real OCI registry (CNCF distribution 2.8): push, resolve, pull, and refusals.

The registries are the `registry` (anonymous) and `auth_registry` (alice/alice-pass) fixtures.
The last tests drive a coordinator's end of a job against them: the final model is pushed to the
job's ``output.image``, and a push that fails leaves the job completed with the reason.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from reconciler.coordinator import Coordinator
from reconciler.reconcile import fetch_desired
from reconciler.registry import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    MODEL_ARTIFACT,
    MODEL_CONFIG_MEDIA_TYPE,
    MODEL_LAYER_MEDIA_TYPE,
    CredentialsRefused,
    InvalidReference,
    NotModelArtifact,
    NotWasmArtifact,
    RegistryClient,
    RegistryError,
)
from reconciler.source import LocalSource
from schemas.connection import ENV_REGISTRY_PASSWORD, ENV_REGISTRY_USERNAME
from schemas.manifests import Output
from schemas.messages import JobPhase, RoundRecord
from schemas.topics import Namespace
from tests.registry import REGISTRY_USERS, Registry

pytestmark = pytest.mark.integration

WASM = Path(__file__).resolve().parents[1] / "wasm"
FIXED_NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MODEL = npy(np.arange(12, dtype=np.float32).reshape(3, 4) / 7)


# -- the manifest field (pure) -------------------------------------------------------------


def test_output_is_a_tag_reference() -> None:
    assert Output(image="127.0.0.1:5000/fl/toy:final").image == "127.0.0.1:5000/fl/toy:final"
    with pytest.raises(ValidationError, match="names a digest, but a push goes to a tag"):
        Output(image="127.0.0.1:5000/fl/toy:final@sha256:" + "ab" * 32)
    with pytest.raises(ValidationError, match="does not name a registry"):
        Output(image="fl/toy:final")


# -- push, resolve, pull -------------------------------------------------------------------


def test_push_then_resolve_and_pull_the_same_bytes(registry: Registry) -> None:
    client = RegistryClient(insecure=True, clock=lambda: FIXED_NOW)
    ref = f"{registry.address}/fl/digits:final"
    pushed = client.push_model(MODEL, ref, {"dev.propeller.job": "digits"}, file_name="digits.npy")
    assert pushed.layer_digest == sha256(MODEL)
    assert pushed.size == len(MODEL)

    resolved = client.resolve(ref, MODEL_ARTIFACT)
    assert (resolved.manifest_digest, resolved.layer_digest, resolved.size) == (
        pushed.manifest_digest, sha256(MODEL), len(MODEL),
    )  # fmt: skip
    assert resolved.config_media_type == MODEL_CONFIG_MEDIA_TYPE
    assert resolved.annotations == {
        ANNOTATION_CREATED: "2026-01-02T03:04:05Z",
        "dev.propeller.job": "digits",
    }

    pulled = client.pull_model(ref)
    assert pulled == MODEL
    assert sha256(pulled) == pushed.layer_digest
    assert client.pull_model(pushed.pinned) == MODEL
    array = np.load(io.BytesIO(pulled), allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (3, 4)

    manifest = client.fetch_manifest(pushed.pinned)
    (layer,) = manifest.document["layers"]
    assert layer["mediaType"] == MODEL_LAYER_MEDIA_TYPE
    assert layer["annotations"] == {ANNOTATION_TITLE: "digits.npy"}
    config = json.loads(client.fetch_blob(ref, manifest.document["config"]["digest"]))
    assert config == {"dtype": "<f4", "shape": [3, 4], "layerDigests": [sha256(MODEL)]}


def test_models_and_modules_are_not_mistaken_for_each_other(registry: Registry) -> None:
    client = RegistryClient(insecure=True)
    model_ref = f"{registry.address}/fl/m:1"
    module_ref = f"{registry.address}/app/add:1"
    client.push_model(MODEL, model_ref)
    client.push_wasm(WASM / "add.wasm", module_ref)
    with pytest.raises(NotWasmArtifact, match="found 0"):
        client.resolve(model_ref)
    with pytest.raises(NotModelArtifact, match="not a model artifact"):
        client.pull_model(module_ref)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a model", "is not a .npy array"),
        (MODEL[:-4], r"header says <f4 of shape \(3, 4\) \(48 bytes\), but 44 bytes follow"),
        (npy(np.array([{"a": 1}], dtype=object)), "holds Python objects"),
    ],
)
def test_push_refuses_what_is_not_a_npy_array(
    registry: Registry, data: bytes, message: str
) -> None:
    client = RegistryClient(insecure=True)
    before = len(registry.access_log())
    with pytest.raises(NotModelArtifact, match=message):
        client.push_model(data, f"{registry.address}/fl/bad:1")
    assert len(registry.access_log()) == before  # refused before any request


def test_push_refuses_a_digest_reference(registry: Registry) -> None:
    with pytest.raises(InvalidReference, match="push to a tag"):
        RegistryClient(insecure=True).push_model(
            MODEL, f"{registry.address}/fl/m@sha256:" + "ab" * 32
        )


def test_a_corrupted_model_is_refused(registry: Registry) -> None:
    client = RegistryClient(insecure=True)
    ref = f"{registry.address}/fl/m:1"
    pushed = client.push_model(MODEL, ref)
    hex_digest = pushed.layer_digest.removeprefix("sha256:")
    stored = registry.storage_path / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest
    data = (stored / "data").read_bytes()
    (stored / "data").write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(RegistryError, match="does not match its digest"):
        client.pull_model(ref)


def test_refused_credentials_are_a_typed_error(auth_registry: Registry) -> None:
    ref = f"{auth_registry.address}/fl/m:1"
    with pytest.raises(CredentialsRefused, match="none were given"):
        RegistryClient(insecure=True).push_model(MODEL, ref)
    with pytest.raises(CredentialsRefused, match="wrong password for user 'alice'"):
        RegistryClient("alice", "wrong", insecure=True).push_model(MODEL, ref)
    with RegistryClient("alice", REGISTRY_USERS["alice"], insecure=True) as alice:
        alice.push_model(MODEL, ref)
        assert alice.pull_model(ref) == MODEL
    with pytest.raises(CredentialsRefused, match="none were given"):
        RegistryClient(insecure=True).pull_model(ref)


# -- the coordinator's push at the end of a job ------------------------------------------


def completed_job(tmp_path: Path, image: str) -> tuple[Coordinator, list[str]]:
    """A coordinator holding job ``toy`` (output ``image``), its rounds done, not finished."""
    fleet = tmp_path / "fleet"
    (fleet / "fl").mkdir(parents=True)
    (fleet / "fl" / "fltoy.wasm").write_bytes((WASM / "fltoy.wasm").read_bytes())
    (fleet / "job.yaml").write_text(
        "apiVersion: propeller/v1\nkind: FederatedJob\nmetadata: {name: toy}\n"
        "spec:\n  trainer: {file: fl/fltoy.wasm}\n  model: {shape: [4]}\n  rounds: 1\n"
        f"  output: {{image: '{image}'}}\n"
    )
    revision, desired = fetch_desired(LocalSource(fleet))
    lines: list[str] = []
    coordinator = Coordinator(
        None,  # type: ignore[arg-type]  # finishing a job publishes nothing
        Namespace(),
        tmp_path / "state",
        name="test",
        owner="propctl",
        progress=lines.append,
        insecure_registry=True,
    )
    coordinator.set_jobs(desired, revision.read)
    run = coordinator.runs["toy"]
    run.checkpoint.completed = 1
    model = run.checkpoint.model
    run.checkpoint.history.append(RoundRecord(round=1, seconds=0.1, model=model, accuracy=0.75))
    return coordinator, lines


def test_a_completed_job_pushes_its_final_model_with_env_credentials(
    auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_REGISTRY_USERNAME, "alice")
    monkeypatch.setenv(ENV_REGISTRY_PASSWORD, REGISTRY_USERS["alice"])
    ref = f"{auth_registry.address}/fl/toy:final"
    coordinator, lines = completed_job(tmp_path, ref)
    run = coordinator.runs["toy"]
    coordinator._finish(run, JobPhase.COMPLETED, None)

    assert run.checkpoint.phase is JobPhase.COMPLETED and run.checkpoint.reason is None
    final = run.final_model_path().read_bytes()
    with RegistryClient("alice", REGISTRY_USERS["alice"], insecure=True) as client:
        resolved = client.resolve(ref, MODEL_ARTIFACT)
        assert client.pull_model(ref) == final
    assert resolved.layer_digest == sha256(final) == run.checkpoint.model
    assert resolved.annotations["dev.propeller.job"] == "toy"
    assert resolved.annotations["dev.propeller.rounds"] == "1"
    assert resolved.annotations["dev.propeller.accuracy"] == "0.75"
    assert resolved.annotations["dev.propeller.model.digest"] == sha256(final)
    assert f"job toy: pushed final model to {ref} as {resolved.manifest_digest}" in lines


def test_a_refused_push_leaves_the_job_completed_with_the_reason(
    auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_REGISTRY_USERNAME, raising=False)
    monkeypatch.delenv(ENV_REGISTRY_PASSWORD, raising=False)
    coordinator, lines = completed_job(tmp_path, f"{auth_registry.address}/fl/toy:final")
    run = coordinator.runs["toy"]
    coordinator._finish(run, JobPhase.COMPLETED, "target accuracy 0.5 reached in round 1")

    assert run.checkpoint.phase is JobPhase.COMPLETED
    reason = run.checkpoint.reason or ""
    assert reason.startswith("target accuracy 0.5 reached in round 1; final model not pushed: ")
    assert "registry refused the credentials" in reason
    saved = json.loads((run.directory / "state.json").read_text())
    assert (saved["phase"], saved["reason"]) == ("Completed", reason)
    assert run.final_model_path().is_file()  # written before the push was tried
    assert any(line.startswith("job toy: final model not pushed: ") for line in lines)
    assert coordinator.status(run).reason == reason
