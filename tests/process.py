"""Server child processes on loopback, for tests and benchmarks: the part they all share.

`ServerProcess` owns a directory (a temporary one unless given), a config file and a log file
in it, and one child process listening on 127.0.0.1:port. Subclasses (`tests.broker.Mosquitto`,
`tests.registry.Registry`) write the config, give the command line and say when the process is
ready; this class starts it (moving an automatic port that another process took meanwhile),
stops, kills, restarts and cleans up. Every started process is also killed at interpreter exit
if nothing stopped it before.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

HOST = "127.0.0.1"

LOG_TAIL_LINES = 40


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def terminate(process: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM ``process`` by pid and wait; SIGKILL after ``timeout``. Its exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def pid_exists(pid: int) -> bool:
    """True while a process (not yet reaped) with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServerProcess(ABC):
    """One server process on 127.0.0.1:port, configured by files in `directory`.

    Nothing starts in the constructor; call `start()` or use it as a context manager (which
    starts it unless running, and `close()`s it on exit). `restart()` keeps the port.

    Subclasses set the class attributes below and implement `_write_config`, `_command`,
    `_is_ready` and `url`.
    """

    #: Raised for set-up, start and stop failures.
    error: ClassVar[type[Exception]] = RuntimeError
    #: What the messages call one instance ("broker", "registry").
    noun: ClassVar[str] = "server"
    #: The program's name in "did not become ready" messages.
    program: ClassVar[str] = "server"
    #: Prefix of the temporary directory made when none is given.
    dir_prefix: ClassVar[str] = "server-"
    #: File names inside `directory`.
    conf_name: ClassVar[str] = "server.conf"
    log_name: ClassVar[str] = "server.log"
    #: Text in the log (since this start) of a process that exited because the port was taken.
    port_in_use_text: ClassVar[str] = "Address already in use"
    #: Seconds between readiness checks.
    poll_interval: ClassVar[float] = 0.01

    def __init__(
        self,
        directory: Path | str | None,
        *,
        port: int | None,
        start_timeout: float,
        stop_timeout: float,
    ) -> None:
        self._owns_dir = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix=self.dir_prefix) if directory is None else directory
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.directory / self.conf_name
        if self.conf_path.exists():
            raise self.error(f"{self.conf_path} exists: use one directory per {self.noun}")
        self._port = port if port is not None else free_port()
        self._auto_port = port is None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_path = self.directory / self.log_name
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    # -- what subclasses provide ---------------------------------------------------------

    @abstractmethod
    def _write_config(self) -> None:
        """Write `conf_path` for the current `port` (called again when the port moves)."""

    @abstractmethod
    def _command(self) -> list[str]:
        """The command line of the server process."""

    @abstractmethod
    def _is_ready(self, log_offset: int) -> bool:
        """True once the running process serves on `port` (`log_offset`: where its log began)."""

    @property
    @abstractmethod
    def url(self) -> str: ...

    @property
    def output_path(self) -> Path:
        """Where the process's stdout and stderr go (appended)."""
        return self.log_path

    # -- properties ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int:
        """Pid of the current (or last) process; raises if it was never started."""
        if self._proc is None:
            raise self.error(f"{self.noun} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Start the process and return once it is ready (see `_is_ready`)."""
        if self.running:
            raise self.error(f"{self.noun} already running (pid {self.pid})")
        deadline = time.monotonic() + self.start_timeout
        while True:
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.output_path.open("ab") as out:
                self._proc = subprocess.Popen(
                    self._command(),
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
            raise self.error(
                f"{self.program} did not become ready on {HOST}:{self._port} ({outcome});"
                f" log tail:\n{self.log_tail()}"
            )

    def _wait_ready(self, log_offset: int, deadline: float) -> str:
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                if self.port_in_use_text in self._log_since(log_offset):
                    return "port-in-use"
                return f"exited with code {self._proc.returncode}"
            if self._is_ready(log_offset):
                self._started_once = True
                return "ready"
            if time.monotonic() > deadline:
                self.kill()
                return f"timed out after {self.start_timeout} s"
            time.sleep(self.poll_interval)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _port_accepts(self) -> bool:
        try:
            with socket.create_connection((HOST, self._port), timeout=0.5):
                return True
        except OSError:
            return False

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
        """Stop, then start again on the same port."""
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
        return f"<{type(self).__name__} {self.url} {state} dir={self.directory}>"


# Safety net: servers still running when the interpreter exits are killed.
_LIVE: set[ServerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()
