"""The reconciler's one MQTT connection.

It connects once and fails fast (``FleetUnreachable``) when the broker cannot be reached or
refuses us, since a terminal command should say so rather than wait. Handlers registered with
``subscribe`` run on paho's network thread: they must only hand the message over.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from schemas.connection import BrokerSettings

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, bool], None]


class FleetUnreachable(Exception):
    """The broker could not be reached, or refused the connection."""


class Broker:
    """A connected paho client with topic-filter handlers."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str | None = None,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_reconnect = on_reconnect
        self.client_id = client_id or f"propctl-{uuid.uuid4().hex[:12]}"
        self._handlers: list[tuple[str, Handler, int]] = []
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._refused: str | None = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
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
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._client = client

    def connect(self, timeout: float = 5.0) -> None:
        try:
            self._client.connect(self.settings.host, self.settings.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise FleetUnreachable(f"cannot reach broker {self.settings.url}: {exc}") from None
        self._client.loop_start()
        if not self._connack.wait(timeout):
            self.close()
            raise FleetUnreachable(f"broker {self.settings.url} did not answer in {timeout}s")
        if self._refused is not None:
            self.close()
            raise FleetUnreachable(self._refused)

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected())

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        with self._lock:
            self._handlers.append((topic_filter, handler, qos))
        result, _mid = self._client.subscribe(topic_filter, qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise FleetUnreachable(f"subscribe to {topic_filter} failed: {result}")

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Broker:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _on_connect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            # Small packets go out at once instead of waiting on a delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reason.is_failure:
            self._refused = f"broker {self.settings.url} refused the connection: {reason}"
        elif self._connack.is_set():
            # A reconnect after the broker went away: the session is clean, subscribe again.
            log.info("reconnected to %s", self.settings.url)
            if self._on_reconnect is not None:
                self._on_reconnect()  # before subscribing: retained messages follow at once
            with self._lock:
                filters = [(f, q) for f, _, q in self._handlers]
            for topic_filter, qos in filters:
                self._client.subscribe(topic_filter, qos)
        self._connack.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for f, h, _ in self._handlers if mqtt.topic_matches_sub(f, msg.topic)]
        for handler in handlers:
            try:
                handler(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:
                log.exception("handler for %s failed", msg.topic)
