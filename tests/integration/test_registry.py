"""Wasm artifacts in a real OCI registry (CNCF distribution 2.8): push, resolve, fetch, auth.

The registries are the `registry` (anonymous) and `auth_registry` (alice/alice-pass) fixtures;
`propctl push` runs as a subprocess like a user runs it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import oras.provider
import pytest
import requests

from reconciler.registry import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    WASM_CONFIG_MEDIA_TYPE,
    WASM_LAYER_MEDIA_TYPE,
    ArtifactNotFound,
    CredentialsRefused,
    InvalidReference,
    NotWasmArtifact,
    Reference,
    RegistryClient,
    RegistryError,
    RegistryUnreachable,
    parse_reference,
    wasm_layer,
)
from tests.registry import REGISTRY_USERS, Registry

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WASM = REPO_ROOT / "tests" / "wasm"
ADD = WASM / "add.wasm"
TRAP = WASM / "trap.wasm"
SHA = "sha256:" + "ab" * 32
FIXED_NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def anonymous() -> RegistryClient:
    return RegistryClient(insecure=True)


def alice(password: str = REGISTRY_USERS["alice"], **kwargs: Any) -> RegistryClient:
    return RegistryClient("alice", password, insecure=True, **kwargs)


class RecordingSession(requests.Session):
    """A session that remembers every request: method, path, Authorization sent, status."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, str | None, int]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        response = super().send(request, **kwargs)
        path = (request.path_url or "").split("?")[0]
        auth = request.headers.get("Authorization")
        self.seen.append((request.method or "", path, auth, response.status_code))
        return response


# -- references (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:5000/app:1", Reference("localhost:5000", "app", "1", None)),
        ("localhost/app", Reference("localhost", "app", "latest", None)),
        ("127.0.0.1:5000/team/app@" + SHA, Reference("127.0.0.1:5000", "team/app", None, SHA)),
        ("ghcr.io/acme/a.b/app:1.0@" + SHA, Reference("ghcr.io", "acme/a.b/app", "1.0", SHA)),
    ],
)
def test_parse_reference(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app:1", "not an OCI reference"),
        ("team/app:1", "does not name a registry"),
        ("localhost:5000/App:1", "not an OCI reference"),
        ("localhost:5000/app@sha256:abc", "not an OCI reference"),
    ],
)
def test_parse_reference_refuses(text: str, message: str) -> None:
    with pytest.raises(InvalidReference, match=message):
        parse_reference(text)


def test_wasm_layer_refuses_other_artifacts() -> None:
    layer = {"mediaType": WASM_LAYER_MEDIA_TYPE, "digest": SHA, "size": 3}
    tar = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": SHA, "size": 3}
    config = {"mediaType": WASM_CONFIG_MEDIA_TYPE, "digest": SHA, "size": 2}
    assert wasm_layer({"config": config, "layers": [tar, layer]}, "x") == (
        SHA,
        3,
        config["mediaType"],
    )
    with pytest.raises(NotWasmArtifact, match="found 0"):
        wasm_layer({"config": config, "layers": [tar]}, "x")
    with pytest.raises(NotWasmArtifact, match="found 2"):
        wasm_layer({"config": config, "layers": [layer, layer]}, "x")
    with pytest.raises(NotWasmArtifact, match="image index"):
        wasm_layer({"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}, "x")


# -- anonymous registry --------------------------------------------------------------------


def test_push_then_resolve_by_tag_and_by_digest(registry: Registry) -> None:
    client = RegistryClient(insecure=True, clock=lambda: FIXED_NOW)
    ref = f"{registry.address}/team/add:1"
    pushed = client.push_wasm(ADD, ref, {"org.example.team": "edge"})
    assert pushed.layer_digest == digest_of(ADD)
    assert pushed.size == ADD.stat().st_size

    by_tag = client.resolve(ref)
    assert (by_tag.manifest_digest, by_tag.layer_digest, by_tag.size) == (
        pushed.manifest_digest, pushed.layer_digest, pushed.size,
    )  # fmt: skip
    assert by_tag.config_media_type == WASM_CONFIG_MEDIA_TYPE
    assert by_tag.annotations == {
        ANNOTATION_CREATED: "2026-01-02T03:04:05Z",
        "org.example.team": "edge",
    }
    by_digest = client.resolve(f"{registry.address}/team/add@{pushed.manifest_digest}")
    assert by_digest.manifest_digest == pushed.manifest_digest
    assert by_digest.layer_digest == digest_of(ADD)
    assert str(by_tag.pinned) == f"{registry.address}/team/add@{pushed.manifest_digest}"

    # The CNCF Wasm layout: OCI image manifest, Wasm config listing the layer, one titled layer.
    manifest = client.fetch_manifest(pushed.pinned)
    assert manifest.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert manifest.digest == pushed.manifest_digest
    (layer,) = manifest.document["layers"]
    assert layer["mediaType"] == WASM_LAYER_MEDIA_TYPE
    assert layer["annotations"] == {ANNOTATION_TITLE: "add.wasm"}
    config = json.loads(client.fetch_blob(ref, manifest.document["config"]["digest"]))
    assert config == {
        "created": "2026-01-02T03:04:05Z",
        "architecture": "wasm",
        "os": "wasip1",
        "layerDigests": [digest_of(ADD)],
    }


def test_a_moved_tag_resolves_to_the_new_digest(registry: Registry) -> None:
    client = anonymous()
    ref = f"{registry.address}/app:stable"
    first = client.push_wasm(ADD, ref)
    second = client.push_wasm(TRAP, ref)
    assert second.manifest_digest != first.manifest_digest

    moved = client.resolve(ref)
    assert moved.manifest_digest == second.manifest_digest
    assert moved.layer_digest == digest_of(TRAP)
    # A digest reference never changes, whatever the tag does.
    assert client.resolve(first.pinned).layer_digest == digest_of(ADD)


def test_fetch_blob_returns_the_exact_bytes(registry: Registry, tmp_path: Path) -> None:
    client = anonymous()
    ref = f"{registry.address}/app:1"
    pushed = client.push_wasm(ADD, ref)
    assert client.fetch_blob(ref, pushed.layer_digest) == ADD.read_bytes()
    dest = tmp_path / "cache" / "add.wasm"
    assert client.download_blob(pushed.pinned, pushed.layer_digest, dest) == pushed.size
    assert dest.read_bytes() == ADD.read_bytes()


def test_a_corrupted_blob_is_refused(registry: Registry, tmp_path: Path) -> None:
    client = anonymous()
    ref = f"{registry.address}/app:1"
    pushed = client.push_wasm(ADD, ref)
    # distribution serves what is on disk without checking it: damage the stored layer.
    hex_digest = pushed.layer_digest.removeprefix("sha256:")
    stored = registry.storage_path / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest
    data = (stored / "data").read_bytes()
    (stored / "data").write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    with pytest.raises(RegistryError, match="does not match its digest"):
        client.fetch_blob(ref, pushed.layer_digest)
    dest = tmp_path / "out" / "add.wasm"
    with pytest.raises(RegistryError, match="does not match its digest"):
        client.download_blob(ref, pushed.layer_digest, dest)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary one


def test_missing_tag_repository_and_blob_are_not_found(registry: Registry) -> None:
    client = anonymous()
    client.push_wasm(ADD, f"{registry.address}/app:1")
    with pytest.raises(ArtifactNotFound, match=r"^not found: .*/app:missing"):
        client.resolve(f"{registry.address}/app:missing")
    with pytest.raises(ArtifactNotFound, match=r"^not found: .*/nothing-here:1"):
        client.resolve(f"{registry.address}/nothing-here:1")
    with pytest.raises(ArtifactNotFound, match=f"not found: blob {SHA}"):
        client.fetch_blob(f"{registry.address}/app:1", SHA)


def test_non_wasm_files_and_artifacts_are_refused(registry: Registry, tmp_path: Path) -> None:
    client = anonymous()
    with pytest.raises(NotWasmArtifact, match="not a WebAssembly module"):
        client.push_wasm(WASM / "notwasm.wasm", f"{registry.address}/app:1")
    component = tmp_path / "component.wasm"
    component.write_bytes(b"\0asm\x0d\x00\x01\x00")
    with pytest.raises(NotWasmArtifact, match="component"):
        client.push_wasm(component, f"{registry.address}/app:1")

    # Pushed by plain oras-py: one wasm layer with an unknown config is still a Wasm artifact,
    # a tar layer is not.
    plain = oras.provider.Registry(insecure=True)
    plain.push(
        f"{registry.address}/plain:1",
        files=[f"{ADD}:{WASM_LAYER_MEDIA_TYPE}"],
        disable_path_validation=True,
        quiet=True,
    )
    resolved = client.resolve(f"{registry.address}/plain:1")
    assert resolved.layer_digest == digest_of(ADD)
    assert resolved.config_media_type == "application/vnd.unknown.config.v1+json"
    plain.push(
        f"{registry.address}/tarball:1",
        files=[f"{ADD}:application/vnd.oci.image.layer.v1.tar"],
        disable_path_validation=True,
        quiet=True,
    )
    with pytest.raises(NotWasmArtifact, match="expected one application/wasm layer, found 0"):
        client.resolve(f"{registry.address}/tarball:1")


def test_push_needs_a_tag(registry: Registry) -> None:
    with pytest.raises(InvalidReference, match="push to a tag"):
        anonymous().push_wasm(ADD, f"{registry.address}/app@{SHA}")


def test_registry_down_is_unreachable_at_once(registry: Registry) -> None:
    client = anonymous()
    ref = f"{registry.address}/app:1"
    client.push_wasm(ADD, ref)
    registry.stop()
    started = time.monotonic()
    with pytest.raises(RegistryUnreachable, match=f"cannot reach registry {registry.address}"):
        client.resolve(ref)
    with pytest.raises(RegistryUnreachable, match="connection refused"):
        client.push_wasm(ADD, ref)
    assert time.monotonic() - started < 2  # oras' own retries would sleep 3 + 5 + ... s

    registry.start()  # storage is on disk: the same artifact is back
    assert client.resolve(ref).layer_digest == digest_of(ADD)


def test_https_to_a_plain_http_registry_says_insecure(registry: Registry) -> None:
    with pytest.raises(RegistryUnreachable, match=r"TLS .* failed .*insecure"):
        RegistryClient().resolve(f"{registry.address}/app:1")


# -- registry with htpasswd ----------------------------------------------------------------


def test_auth_push_and_resolve_with_credentials(auth_registry: Registry) -> None:
    client = alice()
    ref = f"{auth_registry.address}/secure/app:1"
    pushed = client.push_wasm(ADD, ref)
    resolved = client.resolve(ref)
    assert resolved.manifest_digest == pushed.manifest_digest
    assert client.fetch_blob(ref, resolved.layer_digest) == ADD.read_bytes()


def test_auth_refuses_anonymous_and_wrong_password(auth_registry: Registry) -> None:
    ref = f"{auth_registry.address}/secure/app:1"
    alice().push_wasm(ADD, ref)
    with pytest.raises(
        CredentialsRefused, match=r"registry refused the credentials.*none were given"
    ):
        anonymous().resolve(ref)
    with pytest.raises(CredentialsRefused, match="wrong password for user 'alice'"):
        alice("not-her-password").resolve(ref)
    with pytest.raises(CredentialsRefused, match="registry refused the credentials"):
        alice("not-her-password").push_wasm(ADD, f"{auth_registry.address}/secure/other:1")
    assert isinstance(CredentialsRefused("x"), RegistryError)


def test_credentials_go_with_the_first_request(auth_registry: Registry) -> None:
    session = RecordingSession()
    client = alice(session=session)
    before = len(auth_registry.access_log())
    ref = f"{auth_registry.address}/secure/app:1"
    pushed = client.push_wasm(ADD, ref)
    client.resolve(ref)
    client.fetch_blob(ref, pushed.layer_digest)

    methods = [(method, status) for method, _path, _auth, status in session.seen]
    # push: HEAD+POST+PUT per blob (module, config), PUT manifest; resolve: GET; fetch: GET
    assert methods == [
        ("HEAD", 404), ("POST", 202), ("PUT", 201),
        ("HEAD", 404), ("POST", 202), ("PUT", 201),
        ("PUT", 201), ("GET", 200), ("GET", 200),
    ]  # fmt: skip
    assert all(auth is not None and auth.startswith("Basic ") for _m, _p, auth, _s in session.seen)
    # The registry saw the same requests, none of them answered 401.
    served = auth_registry.access_log()[before:]
    assert [(e.method, e.status) for e in served] == methods


def test_env_credentials(auth_registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPELLER_REGISTRY_USERNAME", "alice")
    monkeypatch.setenv("PROPELLER_REGISTRY_PASSWORD", REGISTRY_USERS["alice"])
    client = RegistryClient.from_env(insecure=True)
    assert client.push_wasm(ADD, f"{auth_registry.address}/app:1").layer_digest == digest_of(ADD)
    monkeypatch.delenv("PROPELLER_REGISTRY_PASSWORD")
    with pytest.raises(ValueError, match="PROPELLER_REGISTRY_PASSWORD is not"):
        RegistryClient.from_env(insecure=True)


# -- propctl push --------------------------------------------------------------------------


def propctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_")}
    clean.update(PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "propctl", *args],
        cwd=REPO_ROOT, env=clean, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_propctl_push_prints_the_digest(registry: Registry) -> None:
    ref = f"{registry.address}/cli/add:1"
    done = propctl("push", str(ADD), ref, "--insecure", "--annotation", "org.example.k=v=w")
    assert done.returncode == 0, done.stderr
    resolved = anonymous().resolve(ref)
    assert done.stdout == resolved.manifest_digest + "\n"
    assert resolved.annotations["org.example.k"] == "v=w"
    assert resolved.layer_digest == digest_of(ADD)

    as_json = propctl("push", str(TRAP), ref, "--insecure", "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["reference"] == ref
    assert out["layer_digest"] == digest_of(TRAP)
    assert out["size"] == TRAP.stat().st_size
    assert out["manifest_digest"] == anonymous().resolve(ref).manifest_digest
    assert out["pinned"] == f"{registry.address}/cli/add@{out['manifest_digest']}"


def test_propctl_push_is_reproducible_with_source_date_epoch(registry: Registry) -> None:
    ref = f"{registry.address}/cli/add:1"
    env = {"SOURCE_DATE_EPOCH": "1767225600"}  # 2026-01-01T00:00:00Z
    first = propctl("push", str(ADD), ref, "--insecure", env=env)
    again = propctl("push", str(ADD), ref, "--insecure", env=env)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout  # the tag did not move
    resolved = anonymous().resolve(ref)
    assert resolved.annotations[ANNOTATION_CREATED] == "2026-01-01T00:00:00Z"


def test_propctl_push_credentials(auth_registry: Registry) -> None:
    ref = f"{auth_registry.address}/cli/add:1"
    refused = propctl("push", str(ADD), ref, "--insecure")
    assert refused.returncode == 3, refused.stderr
    assert refused.stdout == ""
    assert "error: registry refused the credentials" in refused.stderr
    assert "hint: give --username and --password, or set PROPELLER_REGISTRY_USERNAME" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr

    wrong = propctl("push", str(ADD), ref, "--insecure", "--username", "alice",
                    "--password", "nope")  # fmt: skip
    assert wrong.returncode == 3
    assert "wrong password for user 'alice'" in wrong.stderr

    env = {"PROPELLER_REGISTRY_USERNAME": "alice",
           "PROPELLER_REGISTRY_PASSWORD": REGISTRY_USERS["alice"]}  # fmt: skip
    done = propctl("push", str(ADD), ref, "--insecure", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == alice().resolve(ref).manifest_digest


def test_propctl_push_errors(registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.address}/cli/add:1"
    missing = propctl("push", str(tmp_path / "nope.wasm"), ref, "--insecure")
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr

    not_wasm = propctl("push", str(WASM / "notwasm.wasm"), ref, "--insecure")
    assert not_wasm.returncode == 2
    assert "not a WebAssembly module" in not_wasm.stderr

    bad_ref = propctl("push", str(ADD), "app:1", "--insecure")
    assert bad_ref.returncode == 2
    assert "not an OCI reference" in bad_ref.stderr

    bad_annotation = propctl("push", str(ADD), ref, "--insecure", "--annotation", "novalue")
    assert bad_annotation.returncode == 2
    assert "use KEY=VALUE" in bad_annotation.stderr

    registry.stop()
    down = propctl("push", str(ADD), ref, "--insecure")
    assert down.returncode == 3
    assert f"error: cannot reach registry {registry.address} over http: connection refused" in (
        down.stderr
    )
    assert "hint: check the registry host and port" in down.stderr
