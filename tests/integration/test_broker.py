"""Tests of the Mosquitto fixtures themselves (tests/broker.py, tests/conftest.py)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from tests.broker import (
    ClientFactory,
    ConnectRefused,
    Mosquitto,
    connect_client,
    free_port,
    generate_tls_files,
    pid_exists,
)

pytestmark = pytest.mark.integration

# Mosquitto 2.0.11 answers a wrong password, an unknown user and an anonymous client alike
# with "Not authorized": MQTT 5 reason code 135, or MQTT 3.1.1 return code 5, which paho 2
# reports as the same ReasonCode (135). It does not use 134 "Bad user name or password".
NOT_AUTHORIZED = 135


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_config_listens_on_loopback_only(broker: Mosquitto) -> None:
    conf = broker.conf_path.read_text()
    listeners = [line for line in conf.splitlines() if line.startswith("listener")]
    assert listeners == [f"listener {broker.port} 127.0.0.1"]
    assert "persistence false" in conf
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert "running" in broker.log_text()


def test_publish_subscribe_round_trip(broker: Mosquitto, mqtt_client: ClientFactory) -> None:
    sub = mqtt_client(broker, "sub")
    pub = mqtt_client(broker, "pub")
    assert [code.value for code in sub.subscribe_wait("t/round/#", qos=1)] == [1]
    pub.publish_wait("t/round/1", b"hello", qos=1)
    msg = sub.next_message(timeout=2)
    assert (msg.topic, msg.payload, msg.qos) == ("t/round/1", b"hello", 1)


def test_retained_survives_for_new_subscriber_but_not_restart(
    broker: Mosquitto, mqtt_client: ClientFactory
) -> None:
    pub = mqtt_client(broker, "pub")
    pub.publish_wait("t/state", b"v1", qos=1, retain=True)

    late = mqtt_client(broker, "late")
    late.subscribe_wait("t/state")
    msg = late.next_message(timeout=2)
    assert (msg.payload, msg.retain) == (b"v1", True)

    port, old_pid = broker.port, broker.pid
    broker.restart()
    assert broker.port == port
    assert broker.pid != old_pid
    assert not pid_exists(old_pid)

    after = mqtt_client(broker, "after-restart")
    after.subscribe_wait("t/state")
    # The marker is published after subscribing; a retained message would be delivered first.
    after.publish_wait("t/state", b"marker", qos=1)
    msg = after.next_message(timeout=2)
    assert (msg.payload, msg.retain) == (b"marker", False)


def test_client_reconnects_after_restart(broker: Mosquitto, mqtt_client: ClientFactory) -> None:
    client = mqtt_client(broker, "reconnecting")
    broker.restart()
    assert client.wait_connack(count=2, timeout=3).value == 0
    client.subscribe_wait("t/again")
    client.publish_wait("t/again", b"x")
    assert client.next_message(timeout=2).payload == b"x"


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    server = Mosquitto(tmp_path / "b")
    with server:
        pid = server.pid
        assert pid_exists(pid)
        server.stop()
        assert not pid_exists(pid)
        assert not server.running
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
        server.stop()  # idempotent
        server.start()
        assert server.pid != pid
        pid = server.pid
    assert not pid_exists(pid)


def test_kill_is_immediate(tmp_path: Path) -> None:
    server = Mosquitto(tmp_path / "b").start()
    pid = server.pid
    server.kill()
    assert not pid_exists(pid)
    assert "terminating" not in server.log_text()  # no clean shutdown after SIGKILL


def test_start_failure_reports_log(tmp_path: Path) -> None:
    server = Mosquitto(tmp_path / "b", extra_config="no_such_option 1", start_timeout=2)
    with pytest.raises(RuntimeError, match="no_such_option"):
        server.start()
    assert not server.running


def test_taken_port_fails_with_log_tail(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = Mosquitto(tmp_path / "b", port=port, start_timeout=0.2)
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()
    assert not server.running


def test_auto_port_moves_when_taken_before_start(tmp_path: Path) -> None:
    server = Mosquitto(tmp_path / "b")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        with server:
            assert server.port != squatter.getsockname()[1]
            assert f"listener {server.port} 127.0.0.1" in server.conf_path.read_text()
            with socket.create_connection((server.host, server.port), timeout=1):
                pass


def test_second_broker_cannot_share_directory(tmp_path: Path) -> None:
    Mosquitto(tmp_path / "b")
    with pytest.raises(RuntimeError, match="one directory per broker"):
        Mosquitto(tmp_path / "b")


def test_shared_broker_round_trip(
    shared_broker: Mosquitto, mqtt_client: ClientFactory, request: pytest.FixtureRequest
) -> None:
    topic = f"t/{request.node.name}"
    client = mqtt_client(shared_broker)
    client.subscribe_wait(topic)
    client.publish_wait(topic, b"shared")
    assert client.next_message(timeout=2).payload == b"shared"


def test_max_queued_messages_passthrough(tmp_path: Path) -> None:
    with Mosquitto(
        tmp_path / "b", max_queued_messages=7, extra_config=["max_inflight_messages 3"]
    ) as s:
        conf = s.conf_path.read_text()
    assert "max_queued_messages 7" in conf
    assert "max_inflight_messages 3" in conf


# -- secure_broker -------------------------------------------------------------------------


def test_secure_alice_connects_over_tls(
    secure_broker: Mosquitto, mqtt_client: ClientFactory
) -> None:
    assert secure_broker.url == f"mqtts://127.0.0.1:{secure_broker.port}"
    alice = mqtt_client(secure_broker, "alice", username="alice", password="alice-pass")
    assert alice.connack_codes[-1].value == 0
    assert not alice.connack_codes[-1].is_failure
    sock = alice.socket()
    assert isinstance(sock, ssl.SSLSocket)
    # The server certificate names 127.0.0.1 and was verified against the fixture's CA.
    cert = sock.getpeercert()
    assert cert is not None
    san = cert["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in san
    assert ("DNS", "localhost") in san


def test_secure_rejects_untrusted_ca(secure_broker: Mosquitto, tmp_path: Path) -> None:
    other_ca, _, _ = generate_tls_files(tmp_path / "other-ca")
    with pytest.raises(ssl.SSLCertVerificationError):
        connect_client(secure_broker, username="alice", password="alice-pass", ca_file=other_ca)


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311])
def test_secure_wrong_password_refused(
    secure_broker: Mosquitto, protocol: MQTTProtocolVersion
) -> None:
    with pytest.raises(ConnectRefused) as refused:
        connect_client(secure_broker, username="alice", password="wrong", protocol=protocol)
    code = refused.value.reason_code
    assert code.is_failure
    assert code.value == NOT_AUTHORIZED
    assert code == "Not authorized"


def test_secure_anonymous_refused(secure_broker: Mosquitto) -> None:
    with pytest.raises(ConnectRefused) as refused:
        connect_client(secure_broker)
    assert refused.value.reason_code.value == NOT_AUTHORIZED


def test_secure_acl_isolates_domains(secure_broker: Mosquitto, mqtt_client: ClientFactory) -> None:
    alice = mqtt_client(secure_broker, "alice", username="alice", password="alice-pass")
    bob = mqtt_client(secure_broker, "bob", username="bob", password="bob-pass")
    # Mosquitto 2 grants the wider subscription and filters each message by the ACL on delivery.
    alice.subscribe_wait("m/dom-b/#")
    alice.subscribe_wait("m/dom-a/c/ch-a/#")

    bob.publish_wait("m/dom-b/c/ch-b/x", b"secret", qos=1)
    # Bob's PUBACK means the broker has routed his message; alice's own publish is routed after
    # it, so once it arrives anything of bob's that reached her would already be in the queue.
    alice.publish_wait("m/dom-a/c/ch-a/y", b"mine", qos=1)
    msg = alice.next_message(timeout=2)
    assert (msg.topic, msg.payload) == ("m/dom-a/c/ch-a/y", b"mine")
    assert alice.drain(wait=0.2) == []
