"""Real Mosquitto brokers on loopback, for tests and benchmarks.

`Mosquitto` writes a config file (plus password, ACL and TLS files when asked) into a directory
and runs `mosquitto -c CONF` as a child process listening on 127.0.0.1 only. `ProbeClient` is a
paho 2.x client with the small amount of synchronisation tests need: wait for CONNACK, SUBACK
and publish acknowledgements, and collect received messages in a queue.

Typical use outside pytest (benchmarks)::

    with Mosquitto() as broker, connect_client(broker) as client:
        client.subscribe_wait("t/#")
        client.publish_wait("t/1", b"x")
        msg = client.next_message()

One broker per directory: the files have fixed names inside it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

# pid_exists is not used here: tests import it (and free_port, HOST) from this module.
from tests.process import HOST, LOG_TAIL_LINES, ServerProcess, free_port, pid_exists  # noqa: F401

#: Users, ACL and topics of the `secure_broker` fixture (exported so tests can build variants).
SECURE_USERS: dict[str, str] = {"alice": "alice-pass", "bob": "bob-pass"}
SECURE_ACL = """\
user alice
topic readwrite m/dom-a/c/ch-a/#

user bob
topic readwrite m/dom-b/c/ch-b/#
"""

_RUNNING = re.compile(r"mosquitto version \S+ running")


class BrokerError(RuntimeError):
    """The broker could not be set up, started or stopped."""


def _mosquitto_binary() -> str:
    found = os.environ.get("MOSQUITTO_BIN") or shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto not found: apt-get install -y mosquitto (or set MOSQUITTO_BIN)")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        raise BrokerError(f"{name} not found on PATH")
    return found


def _run(argv: Sequence[str], cwd: Path) -> None:
    proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BrokerError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}:\n{proc.stderr}{proc.stdout}"
        )


# Everything the openssl CLI needs comes from these files, not from the system openssl.cnf.
# The extensions satisfy strict X.509 verification (Python 3.13's VERIFY_X509_STRICT too).
_CA_CNF = """\
[req]
prompt = no
distinguished_name = dn
x509_extensions = v3_ca
[dn]
CN = Propeller test CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_SERVER_CNF = """\
[req]
prompt = no
distinguished_name = dn
[dn]
CN = localhost
"""

_SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def generate_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """Write a CA and a server certificate for localhost/127.0.0.1 signed by it.

    Returns (ca_file, cert_file, key_file). Keys are EC P-256, which the openssl CLI makes in
    milliseconds; certificates are valid for two days.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.cnf").write_text(_CA_CNF)
    (directory / "server.cnf").write_text(_SERVER_CNF)
    (directory / "server.ext").write_text(_SERVER_EXT)
    openssl = _tool("openssl")
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    serial = uuid.uuid4().int >> 65
    for args in (
        f"req -x509 {ec} -days 2 -sha256 -config ca.cnf -keyout ca.key -out ca.crt",
        f"req -new {ec} -config server.cnf -keyout server.key -out server.csr",
        "x509 -req -days 2 -sha256 -in server.csr -CA ca.crt -CAkey ca.key"
        f" -set_serial {serial} -extfile server.ext -out server.crt",
    ):
        _run([openssl, *shlex.split(args)], directory)
    for key in ("ca.key", "server.key"):
        (directory / key).chmod(0o600)
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


class Mosquitto(ServerProcess):
    """One Mosquitto process listening on 127.0.0.1:port, configured by files in `directory`.

    Nothing starts in the constructor (except generating files); call `start()` or use it as a
    context manager. `restart()` keeps the port; with persistence off (the default) it loses
    retained messages and sessions, like a broker crash with no storage.
    """

    error = BrokerError
    noun = "broker"
    program = "mosquitto"
    dir_prefix = "mosquitto-"
    conf_name = "mosquitto.conf"
    log_name = "mosquitto.log"
    port_in_use_text = "Address already in use"
    poll_interval = 0.01

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        tls: bool = False,
        max_queued_messages: int | None = None,
        extra_config: str | Iterable[str] = (),
        persistence: bool = False,
        allow_anonymous: bool | None = None,
        start_timeout: float = 5.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            directory, port=port, start_timeout=start_timeout, stop_timeout=stop_timeout
        )
        self.users: dict[str, str] = dict(users or {})
        self.acl = acl
        self.tls = tls
        self._ca_file: Path | None = None
        self._cert_file: Path | None = None
        self._key_file: Path | None = None

        lines: list[str] = []
        if os.geteuid() == 0:
            # Otherwise mosquitto 2 drops to user "mosquitto" and cannot write its log here.
            lines.append("user root")
        lines += [f"log_dest file {self.log_path}", "log_timestamp_format %H:%M:%S"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.directory}/"]
        else:
            lines.append("persistence false")
        # Without it Mosquitto's small writes wait on delayed ACKs (about 40 ms per exchange).
        lines.append("set_tcp_nodelay true")
        if max_queued_messages is not None:
            lines.append(f"max_queued_messages {max_queued_messages}")
        if self.users:
            password_file = self.directory / "passwords"
            password_file.write_text("")
            password_file.chmod(0o600)
            passwd = _tool("mosquitto_passwd")
            for name, password in self.users.items():
                _run([passwd, "-b", str(password_file), name, password], self.directory)
            lines.append(f"password_file {password_file}")
        if acl is not None:
            acl_file = self.directory / "acl"
            acl_file.write_text(acl if acl.endswith("\n") else acl + "\n")
            lines.append(f"acl_file {acl_file}")
        if isinstance(extra_config, str):
            extra_config = extra_config.splitlines()
        lines += list(extra_config)
        lines.append("listener PORT_PLACEHOLDER " + HOST)
        if allow_anonymous is None:
            allow_anonymous = not self.users
        # In mosquitto 2 allow_anonymous is a per-listener setting placed after `listener`.
        lines.append(f"allow_anonymous {'true' if allow_anonymous else 'false'}")
        if tls:
            ca, cert, key = generate_tls_files(self.directory / "tls")
            self._ca_file, self._cert_file, self._key_file = ca, cert, key
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        self._config_lines = lines
        self._write_config()

    # -- configuration -------------------------------------------------------------------

    def _write_config(self) -> None:
        text = "\n".join(
            f"listener {self._port} {HOST}"
            if line.startswith("listener PORT_PLACEHOLDER")
            else line
            for line in self._config_lines
        )
        self.conf_path.write_text(text + "\n")

    # -- properties ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{HOST}:{self._port}"

    @property
    def output_path(self) -> Path:
        """Mosquitto's own stdout and stderr (its log goes to `log_path`)."""
        return self.directory / "mosquitto.out"

    @property
    def ca_file(self) -> Path:
        if self._ca_file is None:
            raise BrokerError("broker was configured without tls")
        return self._ca_file

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = super().log_tail(lines)
        try:
            output = self.output_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            output = ""
        if output:
            text += f"\n--- mosquitto stdout/stderr ---\n{output}"
        return text

    # -- lifecycle -----------------------------------------------------------------------

    def _command(self) -> list[str]:
        return [_mosquitto_binary(), "-c", str(self.conf_path)]

    def _is_ready(self, log_offset: int) -> bool:
        # "running" is logged after every listener is bound, so a connect then reaches us,
        # not some other process that took the port.
        return bool(_RUNNING.search(self._log_since(log_offset))) and self._port_accepts()

    def restart(self) -> Self:
        """Stop, then start again on the same port (retained messages are lost)."""
        return super().restart()


# -- client side ---------------------------------------------------------------------------


class ConnectRefused(Exception):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, reason_code: ReasonCode) -> None:
        super().__init__(f"connection refused: {reason_code} ({reason_code.value})")
        self.reason_code = reason_code


class ProbeClient(mqtt.Client):
    """A paho 2.x `Client` (callback API version 2) that tests can wait on.

    Received messages go to `messages` (a queue) unless you replace `on_message`;
    `subscribe_wait` returns the SUBACK reason codes, `publish_wait` waits for the ack.
    Use `connect_client()` (or the `mqtt_client` fixture) to get one connected.
    """

    def __init__(
        self,
        client_id: str | None = None,
        *,
        protocol: MQTTProtocolVersion = mqtt.MQTTv5,
        clean_session: bool | None = None,
    ) -> None:
        super().__init__(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
            clean_session=clean_session,  # MQTT 3.1.1 only; v5 uses clean_start on connect
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack_codes: list[ReasonCode] = []
        self._cond = threading.Condition()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self.on_message = self._record_message
        self.on_connect = self._record_connack
        self.on_subscribe = self._record_suback

    # callbacks (run on paho's network thread)

    def _record_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def _record_connack(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self.connack_codes.append(reason_code)
            self._cond.notify_all()

    def _record_suback(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._subacks[mid] = list(reason_codes)
            self._cond.notify_all()

    # waiting helpers

    def wait_connack(self, count: int = 1, timeout: float = 5.0) -> ReasonCode:
        """Wait until `count` CONNACKs arrived (count=2: reconnected once); return the last."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.connack_codes) >= count, timeout):
                raise TimeoutError(f"no CONNACK #{count} within {timeout} s")
            return self.connack_codes[-1]

    def subscribe_wait(
        self, topic: str, qos: int = 1, timeout: float = 5.0, **kwargs: Any
    ) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; returns its reason codes (granted QoS or error)."""
        result, mid = self.subscribe(topic, qos, **kwargs)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"subscribe {topic!r} failed: {mqtt.error_string(result)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topic!r} within {timeout} s")
            return self._subacks.pop(mid)

    def publish_wait(
        self,
        topic: str,
        payload: bytes | str | None = None,
        qos: int = 1,
        retain: bool = False,
        *,
        timeout: float = 5.0,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Publish and wait until acknowledged (QoS 1/2) or written to the socket (QoS 0)."""
        info = self.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic!r} not acknowledged within {timeout} s")
        return info

    def next_message(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        """The next received message; raises TimeoutError if none arrives in time."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout} s") from None

    def wait_for_topic(self, topic: str, timeout: float = 5.0) -> mqtt.MQTTMessage:
        """Skip messages until one on exactly `topic` arrives; the skipped ones are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next_message(max(0.0, deadline - time.monotonic()))
            if msg.topic == topic:
                return msg

    def drain(self, wait: float = 0.0) -> list[mqtt.MQTTMessage]:
        """Everything received so far (after waiting `wait` seconds), emptying the queue."""
        if wait:
            time.sleep(wait)
        out: list[mqtt.MQTTMessage] = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Disconnect and stop the network thread (and its reconnect attempts). Idempotent."""
        with contextlib.suppress(Exception):
            # Even when not connected: it moves paho to "disconnecting", which ends a pending
            # reconnect wait at once instead of after up to a second.
            self.disconnect()
        self.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect_client(
    broker: Mosquitto,
    client_id: str | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: bool | None = None,
    ca_file: Path | str | None = None,
    protocol: MQTTProtocolVersion = mqtt.MQTTv5,
    keepalive: int = 30,
    clean_start: bool = True,
    will: tuple[str, bytes | str, int, bool] | None = None,
    reconnect_delay: float = 0.1,
    timeout: float = 5.0,
) -> ProbeClient:
    """A `ProbeClient` connected to `broker`, network loop started, CONNACK received.

    TLS is used when the broker has it (override with `tls`), verifying against the broker's CA
    and the 127.0.0.1 address. `will` is (topic, payload, qos, retain). After a lost
    connection paho reconnects by itself, first after `reconnect_delay` seconds (paho's default
    is 1 s; this one is short so broker restarts in tests are quick). Raises `ConnectRefused`
    (with `.reason_code`) when the broker refuses; the client is then already stopped.
    """
    v5 = protocol == mqtt.MQTTv5
    client = ProbeClient(client_id, protocol=protocol, clean_session=None if v5 else clean_start)
    if username is not None:
        client.username_pw_set(username, password)
    use_tls = broker.tls if tls is None else tls
    if use_tls:
        cafile = str(ca_file if ca_file is not None else broker.ca_file)
        client.tls_set(ca_certs=cafile, cert_reqs=ssl.CERT_REQUIRED)
    if will is not None:
        client.will_set(will[0], will[1], qos=will[2], retain=will[3])
    # paho sleeps float seconds here although the parameters are annotated int
    client.reconnect_delay_set(min_delay=reconnect_delay, max_delay=2)  # type: ignore[arg-type]
    try:
        if v5:
            client.connect(broker.host, broker.port, keepalive=keepalive, clean_start=clean_start)
        else:
            client.connect(broker.host, broker.port, keepalive=keepalive)
        client.loop_start()
        code = client.wait_connack(1, timeout)
    except BaseException:
        client.close()
        raise
    if code.is_failure:
        client.close()
        raise ConnectRefused(code)
    return client


class ClientFactory(Protocol):
    """Type of the `mqtt_client` fixture: `mqtt_client(broker, client_id=None, **kwargs)`."""

    def __call__(
        self, broker: Mosquitto, client_id: str | None = None, **kwargs: Any
    ) -> ProbeClient: ...
