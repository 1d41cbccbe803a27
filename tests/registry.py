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

import atexit
import contextlib
import http.client
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.broker import HOST, free_port

#: Users of the `auth_registry` fixture.
REGISTRY_USERS: dict[str, str] = {"alice": "alice-pass"}

_LOG_TAIL_LINES = 40
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


class Registry:
    """One `docker-registry` process on 127.0.0.1:port, configured by files in `directory`.

    Nothing starts in the constructor (except writing files); call `start()` or use it as a
    context manager. Storage survives `restart()` and `kill()` (it is on disk), and the port is
    kept. With `users`, every request needs HTTP basic credentials (htpasswd, bcrypt).
    """

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        users: Mapping[str, str] | None = None,
        port: int | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._owns_dir = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="registry-") if directory is None else directory
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.directory / "config.yml"
        if self.conf_path.exists():
            raise RegistryProcessError(f"{self.conf_path} exists: use one directory per registry")
        self._port = port if port is not None else free_port()
        self._auto_port = port is None
        self.users: dict[str, str] = dict(users or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.storage_path = self.directory / "storage"
        self.log_path = self.directory / "registry.log"
        self.htpasswd_path = self.directory / "htpasswd"
        self._secret = secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
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
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: the registry part of a reference (``ADDRESS/app:1``)."""
        return f"{HOST}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._port}"

    @property
    def pid(self) -> int:
        """Pid of the current (or last) process; raises if it was never started."""
        if self._proc is None:
            raise RegistryProcessError("registry was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def access_log(self) -> list[AccessEntry]:
        """Every request logged so far, oldest first (the readiness probes included)."""
        entries = []
        for line in self.log_text().splitlines():
            if match := _ACCESS.match(line):
                entries.append(AccessEntry(match["method"], match["path"], int(match["status"])))
        return entries

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Start the process and return once ``GET /v2/`` answers (401 counts with auth on)."""
        if self.running:
            raise RegistryProcessError(f"registry already running (pid {self.pid})")
        deadline = time.monotonic() + self.start_timeout
        while True:
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as out:
                self._proc = subprocess.Popen(
                    [_registry_binary(), "serve", str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                    start_new_session=True,  # a ^C reaches pytest only; our finalizer stops it
                )
            _LIVE.add(self)
            outcome = self._wait_ready(log_offset, deadline)
            if outcome == "ready":
                return self
            self._reap()
            if outcome == "port-in-use" and time.monotonic() < deadline:
                if self._auto_port and not self._started_once:
                    self._port = free_port()  # lost a race for the free port: pick another
                    self._write_config()
                else:
                    time.sleep(0.05)  # restart on the same port: the old socket may linger
                continue
            raise RegistryProcessError(
                f"docker-registry did not become ready on {self.address} ({outcome});"
                f" log tail:\n{self.log_tail()}"
            )

    def _wait_ready(self, log_offset: int, deadline: float) -> str:
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                if "address already in use" in self._log_since(log_offset):
                    return "port-in-use"
                return f"exited with code {self._proc.returncode}"
            status = self._probe()
            # A 200 or the htpasswd challenge comes from a registry; anything else on this port
            # (or nothing yet) means keep waiting.
            if status == 200 or (status == 401 and self.users):
                self._started_once = True
                return "ready"
            if time.monotonic() > deadline:
                self.kill()
                return f"timed out after {self.start_timeout} s"
            time.sleep(0.02)

    def _probe(self) -> int | None:
        conn = http.client.HTTPConnection(HOST, self._port, timeout=0.5)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process and wait for it (SIGKILL after `stop_timeout`). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the process and reap it (no clean shutdown, like a crash)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=self.stop_timeout)
        _LIVE.discard(self)

    def restart(self) -> Self:
        """Stop, then start again on the same port; stored artifacts are kept."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and remove the directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self._proc.pid}" if self.running and self._proc else "stopped"
        return f"<Registry {self.url} {state} dir={self.directory}>"


# Safety net: registries still running when the interpreter exits are killed.
_LIVE: set[Registry] = set()


@atexit.register
def _kill_leftovers() -> None:
    for registry in list(_LIVE):
        registry.kill()
