"""module.image references resolved during a pass against a real docker-registry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.reconcile import fetch_desired
from reconciler.registry import RegistryClient
from reconciler.source import LocalSource
from tests.registry import Registry

pytestmark = pytest.mark.integration

WASM = Path(__file__).parents[1] / "wasm"
ROOT = Path(__file__).parents[2]


def manifest(name: str, image: str) -> str:
    return (
        f"apiVersion: propeller/v1\nkind: Task\nmetadata: {{name: {name}}}\n"
        f"spec:\n  module: {{image: '{image}'}}\n  function: add\n  args: ['1', '2']\n"
    )


def push(registry: Registry, module: str, ref: str) -> str:
    with RegistryClient(insecure=True) as client:
        result = client.push_wasm(WASM / f"{module}.wasm", f"{registry.address}/{ref}", {})
    return result.manifest_digest


def test_tags_resolve_to_layer_digests_and_pinned_references(
    registry: Registry, tmp_path: Path
) -> None:
    first = push(registry, "add", "team/app:1")
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    (fleet / "tasks.yaml").write_text(
        manifest("by-tag", f"{registry.address}/team/app:1")
        + "---\n"
        + manifest("by-digest", f"{registry.address}/team/app@{first}")
        + "---\n"
        + manifest("missing", f"{registry.address}/team/none:9")
    )
    progress: list[str] = []
    _rev, desired = fetch_desired(LocalSource(fleet), progress.append, images=True, insecure=True)
    tasks = {t.manifest_name: t for t in desired.tasks}
    module = (WASM / "add.wasm").read_bytes()
    layer = "sha256:" + hashlib.sha256(module).hexdigest()
    for name in ("by-tag", "by-digest"):
        assert (tasks[name].digest, tasks[name].size) == (layer, len(module))
        assert tasks[name].image == f"{registry.address}/team/app@{first}"
        assert tasks[name].error is None
    assert tasks["missing"].digest is None
    assert tasks["missing"].error is not None and "not found" in tasks["missing"].error
    assert "resolved 2 of 3 image reference(s)" in progress

    # The tag moves to another module: the by-tag task resolves to it, by-digest does not move.
    second = push(registry, "hello", "team/app:1")
    _rev, moved = fetch_desired(LocalSource(fleet), images=True, insecure=True)
    tasks = {t.manifest_name: t for t in moved.tasks}
    assert tasks["by-tag"].image == f"{registry.address}/team/app@{second}"
    assert tasks["by-tag"].digest != layer
    assert tasks["by-digest"].digest == layer


def test_validate_does_not_ask_the_registry(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "t.yaml").write_text(manifest("ghost", f"{registry.address}/x/y:1"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROPELLER_CACHE_DIR": str(tmp_path / "c")}
    done = subprocess.run(
        [sys.executable, "-m", "propctl", "validate", "-f", str(tmp_path / "m"), "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # Validation is static: it does not ask the registry.
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["valid"] is True
    assert [e for e in registry.access_log() if "/x/y/" in e.path] == []
