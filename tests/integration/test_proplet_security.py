"""Proplets on a broker with TLS, passwords and a per-domain ACL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.messages import TaskState
from tests.broker import Mosquitto
from tests.fleet import REPO_ROOT, Fleet, module, running_fleet, task

pytestmark = pytest.mark.integration

ADD = module("add")


def credentials(broker: Mosquitto, user: str) -> dict[str, str]:
    return {
        "PROPELLER_BROKER": broker.url,
        "PROPELLER_USERNAME": user,
        "PROPELLER_PASSWORD": f"{user}-pass",
        "PROPELLER_CA_FILE": str(broker.ca_file),
    }


@pytest.fixture
def alice(secure_broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(
        secure_broker, tmp_path / "alice", domain="dom-a", channel="ch-a", username="alice",
        password="alice-pass", ca_file=secure_broker.ca_file,
    ) as fleet:  # fmt: skip
        fleet.serve(ADD)
        yield fleet


@pytest.fixture
def bob(secure_broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(
        secure_broker, tmp_path / "bob", domain="dom-b", channel="ch-b", username="bob",
        password="bob-pass", ca_file=secure_broker.ca_file,
    ) as fleet:  # fmt: skip
        fleet.serve(ADD)
        yield fleet


def test_wrong_password_is_refused_with_a_clear_error(
    secure_broker: Mosquitto, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **credentials(secure_broker, "alice"),
        "PROPELLER_PASSWORD": "wrong",
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "proplet", "--id", "p1", "--data-dir", str(tmp_path / "d"),
         "--domain", "dom-a", "--channel", "ch-a"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 3
    assert "refused the connection: Not authorized" in done.stderr
    assert "--username/--password" in done.stderr


def test_plain_mqtt_to_a_tls_listener_fails_clearly(
    secure_broker: Mosquitto, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "proplet", "--id", "p1", "--broker",
         f"mqtt://127.0.0.1:{secure_broker.port}", "--ca-file", str(secure_broker.ca_file)],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "not mqtts://" in done.stderr


def test_domains_are_isolated(alice: Fleet, bob: Fleet) -> None:
    # The same proplet id in both domains; each only ever sees its own desired set.
    alice.start_proplet("p1", env=credentials(alice.mosquitto, "alice"))
    bob.desire("p1", [task("bobs-task", ADD, function="add", args=["1", "1"])])
    alice.desire("p1", [task("alices-task", ADD, function="add", args=["2", "2"])])
    assert alice.wait_result("p1", "alices-task").result == ["4"]
    time.sleep(0.5)
    names = [t.name for t in alice.state("p1").tasks]
    assert names == ["alices-task"]
    assert "p1" not in bob.observed.states  # alice's proplet reports nothing into bob's domain


def test_a_proplet_cannot_read_another_domain(alice: Fleet, bob: Fleet) -> None:
    # alice's credentials pointed at bob's domain: the ACL lets nothing through either way.
    bob.desire("intruder", [task("bobs-task", ADD, function="add", args=["1", "1"])])
    intruder = bob.start_proplet("intruder", env=credentials(alice.mosquitto, "alice"), wait=False)
    time.sleep(2.0)
    assert intruder.process.poll() is None
    assert "intruder" not in bob.observed.states
    assert ("intruder", "bobs-task") not in bob.observed.results
    assert "applied desired set" not in intruder.log()


def test_tls_proplet_runs_tasks(alice: Fleet) -> None:
    alice.start_proplet("p2", env=credentials(alice.mosquitto, "alice"))
    alice.desire("p2", [task("sum", ADD, function="add", args=["20", "22"])])
    result = alice.wait_result("p2", "sum")
    assert (result.state, result.result) == (TaskState.COMPLETED, ["42"])
