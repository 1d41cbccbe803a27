"""Proplets pulling task modules straight from a real OCI registry, and their bounded cache.

Real proplet processes on a real Mosquitto, and Debian's docker-registry on loopback (the
`registry` and `auth_registry` fixtures). Modules are pushed with the reconciler's client; the
fleet serves nothing over MQTT unless a test says so, so a task that runs got its module from
the registry.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proplet.artifacts import digest_hex
from reconciler.registry import RegistryClient
from schemas.messages import TaskState
from tests.broker import Mosquitto
from tests.fleet import REPO_ROOT, WASM_DIR, Fleet, Module, Proplet, module, running_fleet, task
from tests.registry import REGISTRY_USERS, Registry

pytestmark = pytest.mark.integration

ADD = module("add")  # 167 bytes
HELLO = module("hello")  # 30,646 bytes
INSECURE = ("--insecure-registry",)
ALICE = {
    "PROPELLER_REGISTRY_USERNAME": "alice",
    "PROPELLER_REGISTRY_PASSWORD": REGISTRY_USERS["alice"],
}


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path / "fleet") as f:
        yield f


def push(registry: Registry, mod: Module, repository: str = "team/app", **login: str) -> str:
    """Push ``mod`` and return the reference pinned to its manifest, as the reconciler sends."""
    client = RegistryClient(login.get("username"), login.get("password"), insecure=True)
    with client:
        pushed = client.push_wasm(
            WASM_DIR / f"{mod.name}.wasm", f"{registry.address}/{repository}:1"
        )
    assert pushed.layer_digest == mod.digest
    return str(pushed.pinned)


def blob_gets(registry: Registry, mod: Module) -> list[int]:
    """Status codes of every GET of ``mod``'s blob, in order."""
    return [
        e.status
        for e in registry.access_log()
        if e.method == "GET" and e.path.endswith(f"/blobs/{mod.digest}")
    ]


def cached(proplet: Proplet, mod: Module) -> Path:
    return proplet.data_dir / "cache" / "sha256" / digest_hex(mod.digest)


def compiled(proplet: Proplet, mod: Module) -> list[Path]:
    return sorted((proplet.data_dir / "cache" / "compiled").glob(f"{digest_hex(mod.digest)}.*"))


def test_direct_pull_runs_the_task_and_a_second_task_uses_the_cache(
    fleet: Fleet, registry: Registry
) -> None:
    image = push(registry, ADD)
    p = fleet.start_proplet("p1", *INSECURE)

    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])

    assert fleet.wait_result("p1", "add", timeout=15).result == ["42"]
    assert blob_gets(registry, ADD) == [200]
    assert cached(p, ADD).read_bytes() == ADD.data
    assert compiled(p, ADD)

    fleet.desire(
        "p1",
        [
            task("add", ADD, function="add", args=["2", "40"], image=image),
            task("again", ADD, function="add", args=["1", "2"], image=image),
        ],
    )
    assert fleet.wait_result("p1", "again").result == ["3"]
    assert blob_gets(registry, ADD) == [200]  # not pulled again


def test_pull_mqtt_asks_over_mqtt_and_never_touches_the_registry(
    fleet: Fleet, registry: Registry
) -> None:
    image = push(registry, ADD)
    fleet.serve(ADD)
    fleet.start_proplet("p1", "--pull", "mqtt", *INSECURE)

    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])

    assert fleet.wait_result("p1", "add").result == ["42"]
    assert blob_gets(registry, ADD) == []


def test_modules_without_an_image_still_come_over_mqtt(fleet: Fleet, registry: Registry) -> None:
    fleet.serve(ADD)
    fleet.start_proplet("p1", *INSECURE)
    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"])])
    assert fleet.wait_result("p1", "add").result == ["42"]
    assert blob_gets(registry, ADD) == []


def test_htpasswd_registry_pull_works_with_credentials(
    fleet: Fleet, auth_registry: Registry
) -> None:
    image = push(auth_registry, ADD, username="alice", password=REGISTRY_USERS["alice"])
    fleet.start_proplet("p1", *INSECURE, env=ALICE)

    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])

    assert fleet.wait_result("p1", "add", timeout=15).result == ["42"]
    assert blob_gets(auth_registry, ADD) == [200]  # one request: credentials sent up front


def test_credentials_on_the_command_line_work_too(fleet: Fleet, auth_registry: Registry) -> None:
    image = push(auth_registry, ADD, username="alice", password=REGISTRY_USERS["alice"])
    fleet.start_proplet(
        "p1", *INSECURE, "--registry-username", "alice", "--registry-password", "alice-pass"
    )
    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])
    assert fleet.wait_result("p1", "add", timeout=15).result == ["42"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "none were given and it requires a login"),
        ({**ALICE, "PROPELLER_REGISTRY_PASSWORD": "wrong"}, "wrong password for user 'alice'"),
    ],
    ids=["no-credentials", "wrong-password"],
)
def test_refused_credentials_fail_the_task_with_the_reason(
    fleet: Fleet, auth_registry: Registry, env: dict[str, str], expected: str
) -> None:
    image = push(auth_registry, ADD, username="alice", password=REGISTRY_USERS["alice"])
    fleet.start_proplet("p1", *INSECURE, env=env)

    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])

    status = fleet.wait_task("p1", "add", lambda t: t.state == TaskState.FAILED, timeout=15)
    assert status.reason is not None
    assert f"registry refused the credentials for {auth_registry.address}/team/app" in (
        status.reason
    )
    assert expected in status.reason
    assert "retry 2 in" in status.reason
    assert blob_gets(auth_registry, ADD) == [401]
    assert fleet.observed.results.get(("p1", "add")) is None


def test_a_missing_reference_fails_its_task_and_nothing_else(
    fleet: Fleet, registry: Registry
) -> None:
    image = push(registry, ADD)
    missing = f"{registry.address}/team/missing@sha256:{'0' * 64}"
    fleet.start_proplet("p1", *INSECURE)

    fleet.desire(
        "p1",
        [
            task("ghost", HELLO, image=missing),
            task("add", ADD, function="add", args=["2", "40"], image=image),
        ],
    )

    assert fleet.wait_result("p1", "add", timeout=15).result == ["42"]
    status = fleet.wait_task("p1", "ghost", lambda t: t.state == TaskState.FAILED)
    assert status.reason is not None
    assert status.reason.startswith(
        f"not found: blob {HELLO.digest} in {registry.address}/team/missing (HTTP 404"
    )
    assert fleet.observed.results.get(("p1", "ghost")) is None
    # Retried only at the longest delay (30 s): no storm of requests meanwhile.
    time.sleep(1.5)
    assert blob_gets(registry, HELLO) == [404]


def test_a_registry_that_is_down_is_retried_and_reported(fleet: Fleet, registry: Registry) -> None:
    image = push(registry, ADD)
    p = fleet.start_proplet("p1", *INSECURE)
    registry.stop()

    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])

    status = fleet.wait_task(
        "p1",
        "add",
        lambda t: (
            t.state == TaskState.PENDING
            and "registry unreachable" in (t.reason or "")
            and "retry 3 in" in (t.reason or "")
        ),
        timeout=15,
    )
    assert f"cannot reach {registry.address} over http: connection refused" in (status.reason or "")
    assert "registry unreachable" in p.log()

    registry.start()
    assert fleet.wait_result("p1", "add", timeout=20).result == ["42"]


def _blob_file(registry: Registry, mod: Module) -> Path:
    hex_ = digest_hex(mod.digest)
    return registry.storage_path / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda data: bytes(b ^ 0xFF for b in data[:20]) + data[20:], "does not match its digest"),
        (lambda data: data[:100], "does not match its digest"),
        (lambda data: data + b"\0" * 64, "is larger than the 167 bytes the task expects"),
    ],
    ids=["corrupted", "truncated", "too-long"],
)
def test_damaged_content_is_rejected_fetched_again_and_never_run(
    fleet: Fleet, registry: Registry, damage: object, expected: str
) -> None:
    image = push(registry, ADD)
    blob = _blob_file(registry, ADD)
    assert blob.read_bytes() == ADD.data
    blob.write_bytes(damage(ADD.data))  # type: ignore[operator]
    p = fleet.start_proplet("p1", *INSECURE)

    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])

    status = fleet.wait_task(
        "p1",
        "add",
        lambda t: "retry 3 in" in (t.reason or ""),
        timeout=15,
    )
    assert status.state == TaskState.PENDING
    assert expected in (status.reason or "")
    assert fleet.observed.results.get(("p1", "add")) is None
    assert not cached(p, ADD).exists()
    assert compiled(p, ADD) == []
    leftovers = [f for f in cached(p, ADD).parent.iterdir() if f.name.startswith(".tmp-")]
    assert leftovers == []

    blob.write_bytes(ADD.data)  # repaired: the next retry succeeds
    assert fleet.wait_result("p1", "add", timeout=20).result == ["42"]
    assert len(blob_gets(registry, ADD)) >= 3  # two refused at least, then the good one


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(
    fleet: Fleet, registry: Registry
) -> None:
    add_image = push(registry, ADD, "team/add")
    hello_image = push(registry, HELLO, "team/hello")
    # Room for hello (30,646 bytes) or add (167), not both.
    p = fleet.start_proplet("p1", *INSECURE, "--cache-size", str(len(HELLO.data) + 100))
    first = task("add", ADD, function="add", args=["2", "40"], image=add_image)

    fleet.desire("p1", [first])
    assert fleet.wait_result("p1", "add", timeout=15).result == ["42"]
    assert cached(p, ADD).exists() and compiled(p, ADD)

    # The finished one-shot stays in the set, but only tasks still to run pin their module.
    fleet.desire("p1", [first, task("hello", HELLO, args=["x"], image=hello_image)])
    hello = fleet.wait_result("p1", "hello", timeout=15)
    assert hello.state == TaskState.COMPLETED and "x" in hello.stdout
    assert not cached(p, ADD).exists()
    assert compiled(p, ADD) == []
    assert cached(p, HELLO).exists()

    # The agent keeps working: add is pulled again and hello makes way.
    fleet.desire("p1", [task("add-2", ADD, function="add", args=["1", "1"], image=add_image)])
    assert fleet.wait_result("p1", "add-2", timeout=15).result == ["2"]
    assert blob_gets(registry, ADD) == [200, 200]
    assert cached(p, ADD).exists()
    assert not cached(p, HELLO).exists()
    assert "evicted" in p.log()


def test_the_cache_survives_an_agent_restart(fleet: Fleet, registry: Registry) -> None:
    image = push(registry, ADD)
    p = fleet.start_proplet("p1", *INSECURE)
    fleet.desire("p1", [task("add", ADD, function="add", args=["2", "40"], image=image)])
    assert fleet.wait_result("p1", "add", timeout=15).result == ["42"]
    assert p.terminate() == 0

    fleet.start_proplet("p1", *INSECURE)
    fleet.desire("p1", [task("after", ADD, function="add", args=["5", "5"], image=image)])

    assert fleet.wait_result("p1", "after", timeout=15).result == ["10"]
    assert blob_gets(registry, ADD) == [200]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--cache-size", "lots"), "'lots' is not a size"),
        (("--registry-username", "alice"), "give both --registry-username and"),
        (("--pull", "ftp"), "Invalid value for '--pull'"),
    ],
)
def test_bad_pull_options_exit_with_usage_errors(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "proplet", "--id", "p1", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
