"""Real OCI registries on loopback, for tests and benchmarks.

`Registry` writes a CNCF distribution 2.8 config (plus a bcrypt htpasswd file when given users)
into a directory and runs Debian's `docker-registry serve CONF` as a child process listening on
127.0.0.1 only, with filesystem storage under the same directory. Its stdout and stderr go to
`registry.log`: warnings and errors, and one access-log line per request (combined log format),
which `access_log()` parses so tests can count requests and their status codes.

Typical use outside pytest (benchmarks)::

    with Registry(users={"alice": "alice-pass"}) as registry:
        ref = f"{registry.address}/app:1"

One registry per directory: the files have fixed names inside it.
"""

from __future__ import annotations

import http.client
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tests.process import HOST, ServerProcess

#: Users of the `auth_registry` fixture.
REGISTRY_USERS: dict[str, str] = {"alice": "alice-pass"}

# 127.0.0.1 - - [04/Dec/2026:21:28:25 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "curl/7.88.1"
_ACCESS = re.compile(r'^\S+ \S+ \S+ \[[^]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*"'
                     r" (?P<status>\d{3}) ")  # fmt: skip


class RegistryProcessError(RuntimeError):
    """The registry could not be set up, started or stopped."""


@dataclass(frozen=True)
class AccessEntry:
    """One request as the registry's access log recorded it.

    The log has no user name (authentication happens after it), hence no `user` field.
    """

    method: str
    path: str
    status: int


def _registry_binary() -> str:
    found = os.environ.get("DOCKER_REGISTRY_BIN") or shutil.which("docker-registry")
    if found:
        return found
    raise RegistryProcessError(
        "docker-registry not found: apt-get install -y docker-registry (or set DOCKER_REGISTRY_BIN)"
    )


def _htpasswd_line(user: str, password: str) -> str:
    htpasswd = shutil.which("htpasswd")
    if not htpasswd:
        raise RegistryProcessError("htpasswd not found: apt-get install -y apache2-utils")
    # distribution only accepts bcrypt entries; cost 4 (the minimum) keeps each request cheap.
    proc = subprocess.run(
        [htpasswd, "-B", "-C", "4", "-b", "-n", user, password],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RegistryProcessError(f"htpasswd failed for {user!r}: {proc.stderr.strip()}")
    return proc.stdout.strip()


class Registry(ServerProcess):
    """One `docker-registry` process on 127.0.0.1:port, configured by files in `directory`.

    Nothing starts in the constructor (except writing files); call `start()` or use it as a
    context manager. Storage survives `restart()` and `kill()` (it is on disk), and the port is
    kept. With `users`, every request needs HTTP basic credentials (htpasswd, bcrypt).
    """

    error = RegistryProcessError
    noun = "registry"
    program = "docker-registry"
    dir_prefix = "registry-"
    conf_name = "config.yml"
    log_name = "registry.log"
    port_in_use_text = "address already in use"
    poll_interval = 0.02

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        users: Mapping[str, str] | None = None,
        port: int | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            directory, port=port, start_timeout=start_timeout, stop_timeout=stop_timeout
        )
        self.users: dict[str, str] = dict(users or {})
        self.storage_path = self.directory / "storage"
        self.htpasswd_path = self.directory / "htpasswd"
        self._secret = secrets.token_hex(16)
        if self.users:
            lines = [_htpasswd_line(name, pw) for name, pw in self.users.items()]
            self.htpasswd_path.write_text("\n".join(lines) + "\n")
            self.htpasswd_path.chmod(0o600)
        self._write_config()

    # -- configuration -------------------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",  # access-log lines are written whatever the level
            "  formatter: text",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage_path}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {HOST}:{self._port}",
            f"  secret: {self._secret}",  # without it every start logs a warning
        ]
        if self.users:
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: propeller-test",
                f"    path: {self.htpasswd_path}",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    # -- properties ----------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: the registry part of a reference (``ADDRESS/app:1``)."""
        return f"{HOST}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._port}"

    def access_log(self) -> list[AccessEntry]:
        """Every request logged so far, oldest first (the readiness probes included)."""
        entries = []
        for line in self.log_text().splitlines():
            if match := _ACCESS.match(line):
                entries.append(AccessEntry(match["method"], match["path"], int(match["status"])))
        return entries

    # -- lifecycle -----------------------------------------------------------------------

    def _command(self) -> list[str]:
        return [_registry_binary(), "serve", str(self.conf_path)]

    def _is_ready(self, log_offset: int) -> bool:
        """True once ``GET /v2/`` answers (401 counts with auth on)."""
        status = self._probe()
        # A 200 or the htpasswd challenge comes from a registry; anything else on this port
        # (or nothing yet) means keep waiting.
        return status == 200 or (status == 401 and bool(self.users))

    def _probe(self) -> int | None:
        conn = http.client.HTTPConnection(HOST, self._port, timeout=0.5)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def restart(self) -> Self:
        """Stop, then start again on the same port; stored artifacts are kept."""
        return super().restart()
