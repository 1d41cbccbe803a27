"""How to reach the broker: URL, namespace and credentials, parsed from flags or environment.

Shared by every client of the protocol (proplets, propctl). Parsing only; no sockets here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from schemas.topics import Namespace

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
ENV_BROKER = "PROPELLER_BROKER"
ENV_DOMAIN = "PROPELLER_DOMAIN"
ENV_CHANNEL = "PROPELLER_CHANNEL"
ENV_USERNAME = "PROPELLER_USERNAME"
ENV_PASSWORD = "PROPELLER_PASSWORD"
ENV_CA_FILE = "PROPELLER_CA_FILE"
ENV_REGISTRY_USERNAME = "PROPELLER_REGISTRY_USERNAME"
ENV_REGISTRY_PASSWORD = "PROPELLER_REGISTRY_PASSWORD"


class ConnectionSettingsError(ValueError):
    """Connection settings that cannot work, with what to change."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str
    port: int
    tls: bool
    namespace: Namespace
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def broker_settings(
    url: str,
    *,
    domain: str = "default",
    channel: str = "default",
    username: str | None = None,
    password: str | None = None,
    ca_file: str | Path | None = None,
) -> BrokerSettings:
    """Parse ``mqtt://host:port`` or ``mqtts://host:port`` plus the rest into settings."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConnectionSettingsError(
            f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, not {parts.scheme}://"
        )
    if not parts.hostname:
        raise ConnectionSettingsError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query:
        raise ConnectionSettingsError(f"broker URL {url!r}: only scheme://host:port is accepted")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConnectionSettingsError(f"broker URL {url!r}: {exc}") from None
    if ca_file is not None and not tls:
        raise ConnectionSettingsError("a CA file was given but the broker URL is not mqtts://")
    ca_path = Path(ca_file) if ca_file else None
    if ca_path is not None and not ca_path.is_file():
        raise ConnectionSettingsError(f"CA file {ca_path} does not exist")
    if (username is None) != (password is None) and password is not None:
        raise ConnectionSettingsError("a password was given without a username")
    try:
        namespace = Namespace(domain, channel)
    except ValueError as exc:
        raise ConnectionSettingsError(str(exc)) from None
    return BrokerSettings(
        host=parts.hostname,
        port=port,
        tls=tls,
        namespace=namespace,
        username=username or None,
        password=password,
        ca_file=ca_path,
    )
