"""The agent's one MQTT connection: connect, reconnect with jittered backoff, hand messages over.

paho's callbacks run on the network thread owned here; they only subscribe and pass messages on
to the callables the owner gave. Nothing else in the agent touches the paho client.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from schemas.connection import BrokerSettings

log = logging.getLogger(__name__)


class ConnectionRefused(Exception):
    """The broker answered but refused us (credentials, authorisation): retrying will not help."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: doubling from ``initial`` up to ``maximum``, each scaled by a jitter."""

    initial: float = 0.2
    maximum: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        base: float = min(self.maximum, self.initial * (2**attempt))
        return base * rng.uniform(0.5, 1.0)


def paho_client(
    settings: BrokerSettings,
    client_id: str,
    will: tuple[str, bytes] | None,
    *,
    max_inflight: int,
) -> mqtt.Client:
    """A paho client for ``settings``: MQTT 3.1.1, clean session, credentials, TLS, the will.

    Nothing is queued while disconnected beyond the in-flight window: the owner republishes
    its state on every connect. The board emulator makes its clients here too.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    return client


class Session:
    """One paho client and the thread that keeps it connected."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]],
        on_message: Callable[[str, bytes, bool], None],
        on_connected: Callable[[], None],
        will: tuple[str, bytes] | None = None,
        keepalive: int = 10,
        backoff: Backoff | None = None,
    ) -> None:
        self._settings = settings
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connected = on_connected
        self._keepalive = keepalive
        self._backoff = backoff or Backoff()
        self._rng = random.Random()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._ever_connected = False
        self._connects = 0
        self.refused: str | None = None
        self._thread: threading.Thread | None = None

        client = paho_client(settings, client_id, will, max_inflight=64)
        client.on_connect = self._handle_connect
        client.on_message = self._handle_message
        client.on_disconnect = self._handle_disconnect
        # Only the network thread writes to the socket. Without a registered write callback,
        # paho sends a packet queued from another thread (a worker publishing a result or an
        # upload chunk) on that thread at once, and two threads sending at the same time can
        # interleave the bytes of a large packet with another one. With the callback set, a
        # publish only queues the packet and wakes the loop, which sends it.
        client.on_socket_register_write = _loop_writes
        self._client = client

    # Owner-facing API.
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-session", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait for the first CONNACK; raise ``ConnectionRefused`` if the broker said no."""
        for _ in range(max(1, int(timeout / 0.02))):
            if self._connected.wait(0.02):
                return True
            if self.refused is not None and not self._ever_connected:
                raise ConnectionRefused(self.refused)
        return self._connected.is_set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
        return info

    def stop(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (the broker does not send the will) and end the thread."""
        self._stopping.set()
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    # Network thread.
    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stopping.is_set():
            try:
                if first:
                    self._client.connect(self._settings.host, self._settings.port, self._keepalive)
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                log.warning(
                    "broker %s unreachable (%s); retrying in %.2fs", self._settings.url, exc, delay
                )
                self._stopping.wait(delay)
                continue
            connects = self._connects
            while not self._stopping.is_set():
                rc = self._client.loop(timeout=0.5)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if self._connects > connects:
                attempt = 0
            self._connected.clear()
            if self._stopping.is_set():
                break
            if self.refused is not None and not self._ever_connected:
                return
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            log.info("connection to %s lost; reconnecting in %.2fs", self._settings.url, delay)
            self._stopping.wait(delay)

    def _handle_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self.refused = f"broker {self._settings.url} refused the connection: {reason}"
            log.error("%s", self.refused)
            return
        self.refused = None
        _no_delay(client)
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos)
        self._ever_connected = True
        self._connects += 1
        self._connected.set()
        log.info("connected to %s", self._settings.url)
        self._on_connected()

    def _handle_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from %s: %s", self._settings.url, reason)

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))


def _loop_writes(_client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
    """Nothing to do: the loop in ``Session._run`` sends what is queued."""


def _no_delay(client: mqtt.Client) -> None:
    """Send small MQTT packets at once: Nagle's algorithm would hold them for a delayed ACK."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
