"""Shared pytest fixtures: real Mosquitto brokers on loopback and MQTT clients for them.

- `broker`: a fresh anonymous broker per test (restart/kill it freely).
- `secure_broker`: TLS, password auth and an ACL per user (see `tests.broker.SECURE_ACL`).
- `shared_broker`: one anonymous broker for the whole session; do not stop or restart it, and
  use topics unique to your test (e.g. include `request.node.name`).
- `mqtt_client`: factory `mqtt_client(broker, client_id=None, **kwargs) -> ProbeClient`, a
  connected paho 2.x client; every client it made is disconnected at teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.broker import (
    SECURE_ACL,
    SECURE_USERS,
    ClientFactory,
    Mosquitto,
    ProbeClient,
    connect_client,
)
from tests.process import ServerProcess
from tests.registry import REGISTRY_USERS, Registry

S = TypeVar("S", bound=ServerProcess)


def _running(server: S) -> Iterator[S]:
    """Start ``server`` for a fixture and stop it by its pid afterwards, whatever happened."""
    try:
        server.start()
        yield server
    finally:
        server.stop()  # SIGTERM to its pid, SIGKILL after a bound; reaps it


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A plain anonymous Mosquitto on 127.0.0.1, started for this test and stopped after it."""
    yield from _running(Mosquitto(tmp_path / "mosquitto"))


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto with TLS (`.ca_file`), users alice/alice-pass and bob/bob-pass, and an ACL.

    alice may read and write only `m/dom-a/c/ch-a/#`, bob only `m/dom-b/c/ch-b/#`;
    anonymous clients are refused.
    """
    yield from _running(
        Mosquitto(tmp_path / "mosquitto-secure", users=SECURE_USERS, acl=SECURE_ACL, tls=True)
    )


@pytest.fixture(scope="session")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One anonymous broker for the whole session: never stop or restart it in a test."""
    yield from _running(Mosquitto(tmp_path_factory.mktemp("mosquitto-shared")))


@pytest.fixture
def mqtt_client() -> Iterator[ClientFactory]:
    """Factory for connected `ProbeClient`s (paho 2.x `Client` subclass, loop started).

    Keyword arguments are those of `tests.broker.connect_client`: username, password, tls,
    ca_file, protocol (default MQTTv5), keepalive, clean_start, will, reconnect_delay, timeout.
    A refused connection raises `tests.broker.ConnectRefused` carrying the reason code.
    """
    made: list[ProbeClient] = []

    def make(broker: Mosquitto, client_id: str | None = None, **kwargs: Any) -> ProbeClient:
        client = connect_client(broker, client_id, **kwargs)
        made.append(client)
        return client

    yield make
    for client in reversed(made):
        client.close()


# -- OCI registries (CNCF distribution 2.8, `docker-registry`) -------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """An anonymous OCI registry on 127.0.0.1 (plain HTTP; `.address` is "127.0.0.1:PORT")."""
    yield from _running(Registry(tmp_path / "registry"))


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[Registry]:
    """An OCI registry that needs HTTP basic auth: user alice, password alice-pass."""
    yield from _running(Registry(tmp_path / "registry-auth", users=REGISTRY_USERS))
