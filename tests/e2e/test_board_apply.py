"""Boards end to end: ``propctl apply`` places ``runtime: wamr`` tasks on an emulated board.

The board is a real process (``python -m zephyr.host.emulator``, the board core built as a
shared library), next to a Python proplet that must not get the board's tasks. Modules come
from the Git repository through the reconciler, or from an OCI registry through
``propctl proxy``, in the board's small chunks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.broker import Broker
from schemas.connection import broker_settings
from schemas.messages import ArtifactRequest, Runtime, TaskState, decode
from tests.broker import Mosquitto
from tests.e2e.support import ADD, REPO_ROOT, WASM_DIR, Propctl, apply, task_manifest, to_yaml
from tests.fleet import Fleet, pad_module
from tests.gitrepo import GitRepo
from tests.process import terminate
from tests.registry import Registry
from zephyr.host.library import ENV_LIBRARY, load

pytestmark = pytest.mark.integration

KiB = 1024


@dataclass
class BoardProcess:
    id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM by pid and wait; SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise


def clean_env() -> dict[str, str]:
    # The broker and registry come from the command line; the board library's location stays.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_") or k == ENV_LIBRARY
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


@pytest.fixture
def start_board(
    broker: Mosquitto, fleet: Fleet, tmp_path: Path
) -> Iterator[Callable[..., BoardProcess]]:
    started: list[BoardProcess] = []

    def start(proplet_id: str = "board-1", *args: str) -> BoardProcess:
        log_path = tmp_path / f"{proplet_id}.log"
        command = [
            sys.executable, "-m", "zephyr.host.emulator", "--broker", broker.url,
            "--id", proplet_id, "--heartbeat", "0.5", "--state-dir", str(tmp_path / "boards"),
            "-v", *args,
        ]  # fmt: skip
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path
            )
        board = BoardProcess(proplet_id, process, log_path)
        started.append(board)
        fleet.wait(
            lambda o: o.presence.get(proplet_id) is True and proplet_id in o.states,
            timeout=15,
            what=f"{proplet_id} online",
        )
        return board

    yield start
    for board in started:
        board.terminate()


class Requests:
    """Every artifact request on the broker, as the boards and proplets publish them."""

    def __init__(self, broker: Mosquitto) -> None:
        self.seen: list[ArtifactRequest] = []
        self._lock = threading.Lock()
        settings = broker_settings(broker.url)
        self.client = Broker(settings, client_id="e2e-requests")
        self.client.connect()
        self.client.subscribe(settings.namespace.artifact_request(), self._on_request, qos=1)

    def _on_request(self, _topic: str, payload: bytes, _retained: bool) -> None:
        with self._lock:
            self.seen.append(decode(ArtifactRequest, payload))

    def by(self, proplet: str) -> list[ArtifactRequest]:
        with self._lock:
            return [r for r in self.seen if r.proplet == proplet]


@pytest.fixture
def requests(broker: Mosquitto) -> Iterator[Requests]:
    watch = Requests(broker)
    try:
        yield watch
    finally:
        watch.client.close()


def padded_add(size: int) -> bytes:
    """``add.wasm`` grown to ``size`` bytes by a custom section: the same code in more chunks."""
    return pad_module((WASM_DIR / "add.wasm").read_bytes(), size, seed=3)


def test_apply_places_wamr_tasks_on_the_board_and_nothing_else_there(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, start_board: Callable[..., BoardProcess],
    requests: Requests,
) -> None:  # fmt: skip
    fleet.start_proplet("edge-1")
    board = start_board("board-1", "--labels", "kind=board")
    assert fleet.state("board-1").runtime is Runtime.WAMR
    assert fleet.state("edge-1").runtime is Runtime.WASMTIME
    on_board = task_manifest(
        "sum", ADD, function="add", args=["40", "2"], placement={"runtime": "wamr"}
    )
    on_server = task_manifest(
        "product", ADD, function="mul64", args=["6", "7"], placement={"runtime": "wasmtime"}
    )
    repo.write("fleet/tasks.yaml", to_yaml(on_board, on_server))
    repo.push("one task for the board, one for the server")

    report = apply(propctl, repo, "--wait")

    assert report["in_sync"] is True
    placed = sorted((a["task"], a["proplet"], a["outcome"]) for a in report["actions"])
    assert placed == [("product", "edge-1", "completed"), ("sum", "board-1", "completed")]
    result = fleet.wait_result("board-1", "sum")
    assert (result.state, result.result) == (TaskState.COMPLETED, ["42"])
    assert fleet.wait_result("edge-1", "product").result == ["42"]
    assert [t.name for t in fleet.state("edge-1").tasks] == ["product"]
    assert [t.name for t in fleet.state("board-1").tasks] == ["sum"]
    rows = propctl.tasks()
    assert (rows[("sum", "board-1")]["state"], rows[("sum", "board-1")]["result"]) == (
        "Completed",
        "42",
    )
    board_requests = requests.by("board-1")
    assert board_requests, "the board asked for nothing"
    assert {r.chunk_size for r in board_requests} == {load().sizes.chunk_size}

    assert board.terminate() == 0, board.log()
    fleet.wait(lambda o: o.presence.get("board-1") is False, what="board-1 offline")
    assert "stopping 1 board(s)" in board.log()


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def proxy(broker: Mosquitto, tmp_path: Path) -> Iterator[ProxyProcess]:
    """``propctl proxy`` for a plain-HTTP registry on loopback, stopped by its pid."""
    log_path = tmp_path / "proxy.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "propctl", "proxy", "--insecure", "--broker", broker.url],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path,
        )  # fmt: skip
    running = ProxyProcess(process, log_path)
    try:
        yield running
    finally:
        terminate(process)


def test_an_oci_module_reaches_the_board_through_the_proxy_in_small_chunks(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, registry: Registry, proxy: ProxyProcess,
    start_board: Callable[..., BoardProcess], requests: Requests, tmp_path: Path,
) -> None:  # fmt: skip
    module_path = tmp_path / "add-6k.wasm"
    module_path.write_bytes(padded_add(6 * KiB))
    reference = f"{registry.address}/boards/add:1"
    pushed: dict[str, Any] = propctl.ok(
        "push", str(module_path), reference, "--insecure", "-o", "json"
    ).json()
    fleet.start_proplet("edge-1")
    start_board("board-1")
    manifest = {
        "apiVersion": "propeller/v1",
        "kind": "Task",
        "metadata": {"name": "sum"},
        "spec": {
            "module": {"image": reference},
            "function": "add",
            "args": ["2", "40"],
            "placement": {"runtime": "wamr"},
        },
    }
    repo.write("fleet/sum.yaml", to_yaml(manifest))
    repo.push("a board task from an OCI image")

    report = apply(propctl, repo, "--wait", "--insecure-registry")

    assert [(a["task"], a["proplet"], a["outcome"]) for a in report["actions"]] == [
        ("sum", "board-1", "completed")
    ]
    result = fleet.wait_result("board-1", "sum")
    assert (result.state, result.result) == (TaskState.COMPLETED, ["42"])
    assert fleet.state("edge-1").tasks == []
    board_requests = requests.by("board-1")
    assert board_requests, "the board asked for nothing"
    chunk_size = load().sizes.chunk_size
    for request in board_requests:
        assert request.digest == pushed["layer_digest"]
        assert request.chunk_size == chunk_size  # 6 chunks of 1 KiB, not one of 256 KiB
        assert request.image == pushed["pinned"]
    assert f"pulled {pushed['layer_digest']}" in proxy.log()
