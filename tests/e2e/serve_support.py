"""What the ``propctl serve`` tests drive and watch: serve as a process, its HTTP port, its status.

``Serve`` runs ``python -m propctl serve`` for one test (its own state dir, cache dir, log file
and free port) and always stops it by pid. ``StatusWatch`` follows the retained status message
that serve publishes after every pass.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from reconciler.broker import Broker, FleetUnreachable
from schemas.connection import broker_settings
from schemas.messages import ReconcilerStatus, decode
from tests.broker import free_port
from tests.e2e.support import REPO_ROOT, DesiredWatch
from tests.process import terminate

T = TypeVar("T")
SECRET = b"serve-test-secret"
PASS_LINE = re.compile(r" reconciler\.serve: pass \((?P<reason>[^)]*)\)$", re.MULTILINE)
PASSES_SAMPLE = re.compile(r'^propeller_passes_total\{result="(\w+)"\} (\d+)$', re.MULTILINE)


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def github_push(ref: str, after: str = "0" * 40) -> bytes:
    return json.dumps({"ref": ref, "after": after, "repository": {"full_name": "t/fleet"}}).encode()


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def wait_for(
    probe: Callable[[], T], *, timeout: float, what: str, every: float = 0.05
) -> tuple[T, float]:
    """Poll ``probe`` until it returns something truthy: that value and the seconds it took."""
    started = time.monotonic()
    last: T = probe()
    while not last:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(every)
        last = probe()
    return last, time.monotonic() - started


class Serve:
    """One ``propctl serve`` process; ``stop()`` (SIGTERM, then SIGKILL) is always safe."""

    def __init__(
        self, broker_url: str, tmp: Path, repo_url: str, *args: str, interval: str = "1s"
    ) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.secret_file = tmp / "webhook-secret"
        self.secret_file.write_bytes(SECRET + b"\n")
        self.log_path = tmp / "serve.log"
        self.state_dir = tmp / "state"
        self.command = [
            sys.executable, "-m", "propctl", "serve", "--repo", repo_url,
            "--interval", interval, "--lost-after", "2s",
            "--listen", f"127.0.0.1:{self.port}",
            "--webhook-secret-file", str(self.secret_file),
            "--state-dir", str(self.state_dir), "-v", *args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_")}
        env.update(
            PYTHONPATH=str(REPO_ROOT),
            PROPELLER_BROKER=broker_url,
            PROPELLER_CACHE_DIR=str(tmp / "cache"),
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by pid, SIGKILL after ``timeout``; the exit code."""
        return terminate(self.process, timeout)

    # HTTP.
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                return Response(answer.status, answer.read())
        except urllib.error.HTTPError as error:
            return Response(error.code, error.read())

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def webhook(
        self, body: bytes, *, signature: str | None = None, event: str = "push"
    ) -> Response:
        """A GitHub push webhook, signed with the right secret unless ``signature`` is given."""
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-Hub-Signature-256": signature if signature is not None else sign(body),
        }
        return self.request("POST", "/webhook/github", body, headers)

    def wait_http(self, timeout: float = 15.0) -> None:
        def up() -> bool:
            if not self.alive():
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                return self.get("/readyz").status == 200
            except OSError:
                return False

        wait_for(up, timeout=timeout, what="serve /readyz")

    # Passes.
    def passes(self) -> dict[str, int]:
        """``propeller_passes_total`` by result, from /metrics (finished passes)."""
        text = self.get("/metrics").body.decode()
        return {m.group(1): int(m.group(2)) for m in PASSES_SAMPLE.finditer(text)}

    def total_passes(self) -> int:
        return sum(self.passes().values())

    def started_passes(self) -> list[str]:
        """The reason of every pass started so far, from the log."""
        return [m["reason"] for m in PASS_LINE.finditer(self.log())]

    def metric(self, name: str) -> float:
        """The value of one sample line, e.g. ``propeller_errors_total{stage="fetch"}``."""
        for line in self.get("/metrics").body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class StatusWatch:
    """The retained status of ``propctl serve`` on the broker, as it is rewritten after passes."""

    def __init__(self, broker_url: str) -> None:
        settings = broker_settings(broker_url)
        self.topic = settings.namespace.status()
        self.latest: ReconcilerStatus | None = None
        self.seen: list[ReconcilerStatus] = []
        self._lock = threading.Lock()
        self.client = Broker(settings, client_id=f"e2e-status-{uuid.uuid4().hex[:8]}")
        self.client.connect()
        self.client.subscribe(self.topic, self._on_status, qos=1)

    def close(self) -> None:
        self.client.close()

    def wait(
        self, predicate: Callable[[ReconcilerStatus], bool], *, timeout: float, what: str
    ) -> tuple[ReconcilerStatus, float]:
        def probe() -> ReconcilerStatus | None:
            with self._lock:
                status = self.latest
            return status if status is not None and predicate(status) else None

        return wait_for(probe, timeout=timeout, what=f"status: {what}")

    def _on_status(self, _topic: str, payload: bytes, _retained: bool) -> None:
        if not payload:
            return
        status = decode(ReconcilerStatus, payload)
        with self._lock:
            self.latest = status
            self.seen.append(status)


def retained_desired(broker_url: str, timeout: float = 2.0) -> dict[str, list[str]] | None:
    """Task names of every retained desired set, by proplet; None when the broker is not up."""
    try:
        watch = DesiredWatch(broker_url)
    except (FleetUnreachable, AssertionError):
        return None
    try:
        return {p: sorted(t.name for t in d.tasks) for p, d in watch.sync(timeout)}
    except AssertionError:
        return None
    finally:
        watch.close()
